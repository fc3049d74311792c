"""Logs an operator can use: one line per event, and with --log-format json one JSON object per
line that names the event, the client's address, user, vhost, connection name, pool and reason."""

from __future__ import annotations

import dataclasses
import json
import socket

import pika
import pytest
from support import wait_for


def lines_about(log: str, port: int) -> list[str]:
    """The log lines that name a client by its source port."""
    return [line for line in log.splitlines() if f":{port}" in line]


def connect_from(proxy, tenant) -> tuple[int, Exception | None]:
    """Connect with pika and close; (the client's source port, the refusal if any)."""
    params = proxy.params(user=tenant.user, password=tenant.password, vhost=tenant.vhost)
    params.connection_attempts = 1
    conn = None
    try:
        conn = pika.BlockingConnection(params)
        port = conn._impl._transport._sock.getsockname()[1]
        conn.close()
        return port, None
    except pika.exceptions.AMQPConnectionError as exc:
        return -1, exc


@pytest.mark.timeout(60)
def test_json_lines_name_the_event_and_its_subject(proxy_factory, tenant):
    p = proxy_factory("--log-format", "json")
    conn = p.connect(tenant, client_properties={"connection_name": "itest-json-logs"})
    port = conn._impl._transport._sock.getsockname()[1]
    conn.close()
    wait_for(lambda: "client.disconnected" in p.log(), 5)
    events = [json.loads(line) for line in p.log().splitlines() if line.startswith("{")]
    assert events and all(line.startswith(("{", "$ ")) for line in p.log().splitlines())
    assert all({"time", "level", "logger", "event", "message"} <= set(e) for e in events)
    mine = [e for e in events if e.get("client") == f"127.0.0.1:{port}"]
    assert [e["event"] for e in mine] == ["client.connected", "client.disconnected"]
    for e in mine:
        assert e["user"] == tenant.user and e["vhost"] == tenant.vhost
        assert e["connection_name"] == "itest-json-logs"
        assert e["pool"] == f"{tenant.user}@{tenant.vhost}"
    assert mine[1]["reason"] == "closed by client"
    assert any(e["event"] == "upstream.connected" for e in events)
    assert tenant.password not in p.log()


@pytest.mark.timeout(60)
def test_a_refused_login_is_one_line(proxy_factory, tenant):
    p = proxy_factory()
    wrong = dataclasses.replace(tenant, password="not-the-password")
    before = p.log()
    _, refusal = connect_from(p, wrong)
    assert refusal is not None
    wait_for(lambda: "403" in p.log()[len(before) :], 5)
    new = [line for line in p.log()[len(before) :].splitlines() if line.strip()]
    assert len([line for line in new if "ACCESS_REFUSED" in line]) == 1, new


@pytest.mark.timeout(60)
def test_an_unreachable_broker_is_one_line_per_client(proxy_factory, tenant):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    p = proxy_factory("--outbox-hold", "0", upstream=f"amqp://127.0.0.1:{dead}", healthz=False)
    for _ in range(3):
        _, refusal = connect_from(p, tenant)
        assert refusal is not None
    wait_for(lambda: p.log().count("closing client") >= 3, 5)
    lines = [line for line in p.log().splitlines() if "Connection refused" in line]
    per_client = [line for line in lines if "closing client" in line]
    assert len(per_client) == 3, lines
    assert len(lines) - len(per_client) <= 2, lines  # the broker-level warnings, not per client
