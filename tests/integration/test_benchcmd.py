"""``amqproxy bench URL`` (issue 12): a user's own measurement of what the proxy gains against
their broker. It prints direct and proxied cycles, the gain and the round trip, as text or JSON,
and leaves no queue behind — here against the test broker, and behind a 50 ms relay."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import pytest
from support import FaultRelay, rabbitmqctl, run_proxy_cli
from support.broker import Tenant

CYCLES = 5


def _url(tenant: Tenant, port: int) -> str:
    return f"amqp://{tenant.user}:{tenant.password}@127.0.0.1:{port}/{quote(tenant.vhost, '')}"


def _queues(tenant: Tenant) -> list[str]:
    out = rabbitmqctl("list_queues", "-q", "--no-table-headers", "-p", tenant.vhost, "name")
    return [line.strip() for line in out.splitlines() if line.strip()]


@pytest.mark.timeout(60)
def test_bench_prints_direct_proxied_and_the_gain(tenant: Tenant) -> None:
    res = run_proxy_cli(["bench", "-n", str(CYCLES), _url(tenant, 5672)], timeout=45)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"vhost {tenant.vhost!r}" in out and tenant.password not in out
    assert re.search(r"round trip to the broker: \d+\.\d\d ms", out), out
    for name in ("direct", "through amqproxy"):
        assert re.search(rf"^  {name} +(\d+\.\d\d +){{3}}\d+$", out, re.M), out
    assert re.search(r"^gain: \d+\.\d x as many cycles per second", out, re.M), out
    published = 2 * CYCLES + 2
    assert f"messages: {published} published, {published} in the queue" in out, out
    assert _queues(tenant) == []


@pytest.mark.timeout(60)
def test_bench_json_behind_a_50ms_relay(tenant: Tenant, fault_relay: FaultRelay) -> None:
    fault_relay.delay = 0.025  # each way: a broker 50 ms away
    url = _url(tenant, fault_relay.port)
    res = run_proxy_cli(["bench", "-n", str(CYCLES), "--json", url], timeout=45)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert 45 <= r["rtt_ms"] <= 200
    assert r["direct"]["n"] == r["proxied"]["n"] == CYCLES
    # a direct cycle pays several round trips, a proxied one none
    assert r["direct"]["mean_ms"] > 4 * 45
    assert r["proxied"]["mean_ms"] < r["direct"]["mean_ms"] / 4
    assert r["speedup"] == pytest.approx(r["direct"]["mean_ms"] / r["proxied"]["mean_ms"])
    assert r["published"] == r["in_queue"] == 2 * CYCLES + 2
    assert r["queue_deleted"] is True and r["queue"].startswith("amqproxy-bench-")
    assert _queues(tenant) == []


def test_bench_refused_credentials_say_so(tenant: Tenant) -> None:
    url = f"amqp://{tenant.user}:wrong@127.0.0.1:5672/{quote(tenant.vhost, '')}"
    res = run_proxy_cli(["bench", "-n", "1", url], timeout=30)
    assert res.returncode == 1
    assert "ACCESS_REFUSED" in res.stderr, res.stderr
