"""The outbox: a message whose client got the proxy's CloseOk reaches the broker, and no broker
error lands on another client (README, "Delivery guarantee").

Every fault goes through the tests' own relay between the proxy and the broker (cut, refuse,
freeze, replies held back), never the shared broker. Races are made to happen on purpose by
holding the broker's replies in the relay.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pika
import pytest
from pamqp import commands
from pamqp import frame as pframe
from support import (
    OUTBOX_MESSAGES,
    UPSTREAM_CHANNEL_OPENS,
    direct,
    drain,
    queue_counts,
    wait_for,
)
from support.raw import RawAMQP

PHP_DRIVER = Path(__file__).resolve().parents[1] / "clients" / "php" / "driver.php"
MIXED_SECONDS = float(os.environ.get("AMQPROXY_TEST_MIXED_SECONDS", "10"))
REFUSED = "amqproxy_messages_refused_total"
REPLAYED = "amqproxy_messages_replayed_total"


class PublishLoop(threading.Thread):
    """pika publish-and-close cycles without confirms (a PHP script's pattern), recording
    which bodies were handed over (Connection.CloseOk received) and which cycles failed."""

    def __init__(self, proxy, tenant, queue: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self.proxy, self.tenant, self.queue, self.prefix = proxy, tenant, queue, prefix
        self.stop = threading.Event()
        self.ok: list[bytes] = []
        self.errors: list[tuple[bytes, str]] = []

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            body = f"{self.prefix}-{i}".encode()
            i += 1
            try:
                conn = self.proxy.connect(self.tenant, blocked_connection_timeout=20)
                ch = conn.channel()
                ch.basic_publish("", self.queue, body)
                ch.close()
                conn.close()
                self.ok.append(body)
            except Exception as exc:
                self.errors.append((body, repr(exc)))
                time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        assert not self.is_alive(), "the publisher loop hung"


def _settle(proxy, tenant, timeout: float = 15) -> None:
    """The proxy's outbox for the tenant is empty: everything is confirmed by the broker."""
    proxy.wait_metric(OUTBOX_MESSAGES, 0, timeout=timeout, **tenant.labels)


def _check_delivered(tenant, queue: str, handed_over: list[bytes]) -> dict[bytes, int]:
    """Every body whose client got CloseOk is in the queue; returns the counts per body."""
    counts: dict[bytes, int] = {}
    for body, _, _ in drain(tenant, queue):
        counts[body] = counts.get(body, 0) + 1
    missing = [b for b in handed_over if b not in counts]
    assert not missing, (
        f"{len(missing)} of {len(handed_over)} handed-over messages lost: {missing[:5]}"
    )
    return counts


def _duplicates(counts: dict[bytes, int]) -> int:
    return sum(n - 1 for n in counts.values())


@pytest.mark.timeout(90)
def test_cut_and_two_second_outage_loses_nothing_and_no_publisher_sees_an_error(
    proxy_factory, fault_relay, tenant, queues
):
    """A pika publish-and-close loop runs while the upstream is cut and the broker stays
    unreachable for 2 s: every message whose client got CloseOk arrives, and no cycle fails
    (clients the broker accepted before are admitted during the hold)."""
    p = proxy_factory("-t", "60", upstream=fault_relay.url)
    q = queues.declare(tenant)
    loop = PublishLoop(p, tenant, q, "cut")
    loop.start()
    time.sleep(1.0)
    fault_relay.mode = "refuse"
    fault_relay.cut()
    time.sleep(2.0)
    during = len(loop.ok)
    fault_relay.mode = "forward"
    time.sleep(1.5)
    loop.finish()
    _settle(p, tenant)
    counts = _check_delivered(tenant, q, loop.ok)
    assert loop.errors == [], f"publishers saw errors: {loop.errors[:3]}"
    assert len(loop.ok) > during > 0, "the loop did not run through the outage"
    print(
        f"handed over {len(loop.ok)}, duplicates {_duplicates(counts)}, "
        f"replayed {p.metric(REPLAYED, **tenant.labels)}"
    )


@pytest.mark.timeout(90)
def test_php_amqplib_loop_through_a_cut_loses_nothing(proxy_factory, fault_relay, tenant, queues):
    """The same with php-amqplib: one process looping publish-and-close without confirms."""
    php = shutil.which("php")
    if php is None or not Path("/usr/share/php/PhpAmqpLib").is_dir():
        pytest.fail("php-amqplib is not installed (tests/install.sh installs it)")
    p = proxy_factory("-t", "60", upstream=fault_relay.url)
    q = queues.declare(tenant)
    args = {
        "host": p.host,
        "port": p.port,
        "user": tenant.user,
        "password": tenant.password,
        "vhost": tenant.vhost,
        "q": q,
        "prefix": "php",
        "seconds": 5,
    }
    proc = subprocess.Popen(
        [php, str(PHP_DRIVER), "publish_loop", json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    fault_relay.mode = "refuse"
    fault_relay.cut()
    time.sleep(2.0)
    fault_relay.mode = "forward"
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    handed_over = [b.encode() for b in result["ok"]]
    _settle(p, tenant)
    counts = _check_delivered(tenant, q, handed_over)
    assert result["errors"] == [], result["errors"][:3]
    assert len(handed_over) > 20
    print(f"php: handed over {len(handed_over)}, duplicates {_duplicates(counts)}")


@pytest.mark.timeout(60)
def test_unsettled_channel_is_not_handed_to_the_next_client(
    proxy_factory, fault_relay, tenant, queues
):
    """Client A publishes to a missing exchange and leaves; the broker's 404 is held back in
    the relay. Client B, same credentials, must neither get A's channel nor wait for the
    broker: it gets a new channel at once, and A's error never reaches it."""
    p = proxy_factory("-t", "60", upstream=fault_relay.url)
    q = queues.declare(tenant)
    warm = p.connect(tenant)  # the pool is proven and holds one settled channel
    warm.channel().basic_publish("", q, b"warm")
    warm.close()
    _settle(p, tenant)

    fault_relay.hold_replies()
    a = p.connect(tenant)
    ach = a.channel()
    ach.basic_publish("itest-no-such-exchange", "k", b"lost")
    a.close()  # answered by the proxy: A's channel now waits for the broker's verdict

    t0 = time.monotonic()
    b = p.connect(tenant)
    bch = b.channel()  # no parked channel is settled: a new one, without an upstream round trip
    opened_in = time.monotonic() - t0
    bch.basic_publish("", q, b"good")
    result: dict[str, object] = {}

    def passive() -> None:
        try:
            result["ok"] = bch.queue_declare(q, passive=True).method.queue
        except Exception as exc:
            result["error"] = exc

    worker = threading.Thread(target=passive)
    worker.start()
    time.sleep(0.3)
    fault_relay.release_replies()  # A's 404 first, then B's DeclareOk
    worker.join(10)
    b.close()
    assert opened_in < 1.0, f"the channel waited for the broker ({opened_in:.2f}s)"
    assert result == {"ok": q}, f"client B saw {result}"
    assert p.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) == 2
    wait_for(
        lambda: any("404" in ln and "itest-no-such-exchange" in ln for ln in p.log().splitlines()),
        5,
        message="the orphaned 404 was not logged",
    )
    assert p.metric(REFUSED, **tenant.labels) == 1
    _settle(p, tenant)
    assert sorted(b for b, _, _ in drain(tenant, q)) == [b"good", b"warm"]


@pytest.mark.timeout(40)
def test_publishes_after_a_refused_one_are_replayed(proxy, tenant, queues):
    """One write: good-1, a publish to a missing exchange, good-2, good-3, then Close. The
    broker processes good-1, closes the channel on the bad one and drops the rest; the proxy
    answered for all of them, so it publishes good-2 and good-3 again on another channel, and
    logs the refused one with the client's name."""
    q = queues.declare(tenant)
    raw = RawAMQP(proxy.host, proxy.port)
    raw.handshake(tenant.user, tenant.password, tenant.vhost, connection_name="refused-probe")
    raw.open_channel(1)
    raw.send_raw(
        raw.content_frames(1, "", q, b"good-1")
        + raw.content_frames(1, "itest-missing-exchange", "k", b"bad")
        + raw.content_frames(1, "", q, b"good-2")
        + raw.content_frames(1, "", q, b"good-3")
        + pframe.marshal(commands.Channel.Close(200, "bye", 0, 0), 1)
        + pframe.marshal(commands.Connection.Close(200, "bye", 0, 0), 0)
    )
    raw.read_until(lambda c, v: isinstance(v, commands.Connection.CloseOk), 5)
    raw.abort()
    wait_for(lambda: queue_counts(tenant, q)[0] >= 3, 5)
    _settle(proxy, tenant)
    assert sorted(b for b, _, _ in drain(tenant, q)) == [b"good-1", b"good-2", b"good-3"]
    assert proxy.metric(REFUSED, **tenant.labels) == 1
    assert proxy.metric(REPLAYED, **tenant.labels) == 2
    line = next(ln for ln in proxy.log().splitlines() if "refused by the broker" in ln)
    assert "refused-probe" in line and "itest-missing-exchange" in line and "404" in line


@pytest.mark.timeout(40)
def test_nacked_messages_are_counted_and_logged_not_retried(proxy, tenant, queues):
    """A queue that rejects publishes when full: the broker nacks; the proxy counts and logs
    the refused messages and does not retry them."""
    q = queues.declare(tenant, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    c = proxy.connect(tenant)
    ch = c.channel()
    for i in range(3):
        ch.basic_publish("", q, f"m-{i}".encode())
    c.close()
    _settle(proxy, tenant)
    assert proxy.metric(REFUSED, **tenant.labels) == 2
    assert [b for b, _, _ in drain(tenant, q)] == [b"m-0"]
    assert wait_for(lambda: proxy.log().count("nacked by the broker") == 2, 5)


@pytest.mark.timeout(int(MIXED_SECONDS) + 60)
def test_errors_of_bad_publishers_never_reach_good_ones(proxy, tenant, queues):
    """Six clients publish to a missing exchange and leave, six others on the same credentials
    publish correctly and check with a synchronous call: no good cycle ever fails.
    (AMQPROXY_TEST_MIXED_SECONDS sets the duration, 10 s by default; 60 s for the full run.)"""
    q = queues.declare(tenant)
    stop = threading.Event()
    good_cycles: list[int] = []
    good_errors: list[str] = []

    def bad() -> None:
        while not stop.is_set():
            try:
                c = proxy.connect(tenant)
                c.channel().basic_publish("itest-missing-exchange", "k", b"bad")
                c.close()
            except Exception:
                pass

    def good() -> None:
        n = 0
        while not stop.is_set():
            try:
                c = proxy.connect(tenant)
                ch = c.channel()
                ch.basic_publish("", q, b"good")
                ch.queue_declare(q, passive=True)
                c.close()
                n += 1
            except Exception as exc:
                good_errors.append(repr(exc))
        good_cycles.append(n)

    threads = [threading.Thread(target=f, daemon=True) for f in [bad] * 6 + [good] * 6]
    for t in threads:
        t.start()
    time.sleep(MIXED_SECONDS)
    stop.set()
    for t in threads:
        t.join(20)
    assert good_errors == [], f"{len(good_errors)} good cycles failed: {good_errors[:3]}"
    assert sum(good_cycles) > 20
    _settle(proxy, tenant)
    assert queue_counts(tenant, q)[0] == sum(good_cycles)
    print(f"good cycles {sum(good_cycles)}, refused {proxy.metric(REFUSED, **tenant.labels)}")


@pytest.mark.timeout(60)
def test_full_outbox_holds_publishers_and_drops_nothing(proxy_factory, fault_relay, tenant, queues):
    """With the broker unreachable and a 256 KiB outbox, a publisher is stopped (TCP
    backpressure and Connection.Blocked) instead of buffered without bound; once the broker is
    back it is released and every message arrives."""
    p = proxy_factory("-t", "60", "--outbox-max-bytes", str(256 * 1024), upstream=fault_relay.url)
    q = queues.declare(tenant)
    c = p.connect(tenant)
    ch = c.channel()
    blocked: list[str] = []
    c.add_on_connection_blocked_callback(lambda _c, frame: blocked.append("blocked"))
    c.add_on_connection_unblocked_callback(lambda _c, frame: blocked.append("unblocked"))
    fault_relay.mode = "refuse"
    fault_relay.cut()
    body = b"x" * 1000
    sent = 0
    deadline = time.monotonic() + 10
    while "blocked" not in blocked and time.monotonic() < deadline:
        ch.basic_publish("", q, body)
        sent += 1
        c.process_data_events(0)
    assert blocked == ["blocked"], "the publisher was never told the outbox is full"
    m = p.metrics()
    held = m.get("amqproxy_outbox_bytes", **tenant.labels)
    assert 256 * 1024 < held < 2 * 1024 * 1024, held
    assert m.get("amqproxy_outbox_full_seconds_total") >= 0
    _status, health = p.http_get("/healthz")
    assert "outbox over half full" in health
    fault_relay.mode = "forward"
    c.process_data_events(time_limit=5)
    assert blocked == ["blocked", "unblocked"]
    c.close()
    _settle(p, tenant)
    assert queue_counts(tenant, q)[0] == sent
    assert p.metrics().get("amqproxy_outbox_full_seconds_total") > 0


@pytest.mark.timeout(60)
def test_sigterm_with_the_broker_unreachable_logs_what_was_not_delivered(
    proxy_factory, fault_relay, tenant, queues
):
    p = proxy_factory(
        "-t",
        "60",
        "--term-timeout",
        "2",
        "--term-client-close-timeout",
        "0",
        upstream=fault_relay.url,
    )
    q = queues.declare(tenant)
    c = p.connect(tenant)
    c.channel().basic_publish("", q, b"warm")
    c.close()
    _settle(p, tenant)
    fault_relay.mode = "refuse"
    fault_relay.cut()
    for i in range(3):  # admitted during the hold; their messages wait in the outbox
        c = p.connect(tenant)
        c.channel().basic_publish("", q, f"held-{i}".encode())
        c.close()
    p.send_signal(signal.SIGTERM)
    assert p.wait_exit(20) == 0
    errors = [ln for ln in p.log().splitlines() if " ERROR " in ln]
    assert any(
        "3 message(s)" in ln and f"{tenant.user}@{tenant.vhost}: 3" in ln for ln in errors
    ), errors


@pytest.mark.timeout(60)
def test_silent_upstream_is_detected_and_its_messages_replayed(
    proxy_factory, fault_relay, tenant, queues
):
    """The network path to the broker goes silent (no reset): the upstream heartbeat notices,
    the publisher carries on, and what the dead connection did not confirm is replayed."""
    p = proxy_factory("-t", "60", "--upstream-heartbeat", "2", upstream=fault_relay.url)
    q = queues.declare(tenant)
    c = p.connect(tenant)
    ch = c.channel()
    ch.basic_publish("", q, b"before")
    _settle(p, tenant)
    fault_relay.mode = "freeze"
    for i in range(5):
        ch.basic_publish("", q, f"frozen-{i}".encode())
    t0 = time.monotonic()
    wait_for(lambda: "missed heartbeats" in p.log(), 10, message="the silence went unnoticed")
    noticed = time.monotonic() - t0
    fault_relay.mode = "forward"  # the frozen connection stays dead; new ones work
    ch.basic_publish("", q, b"after")
    c.close()
    _settle(p, tenant, timeout=20)
    bodies = sorted(b for b, _, _ in drain(tenant, q))
    assert bodies == sorted([b"before", b"after"] + [f"frozen-{i}".encode() for i in range(5)])
    assert p.metric(REPLAYED, **tenant.labels) == 5
    assert noticed < 6, f"a 2 s heartbeat noticed the silence after {noticed:.1f}s"


@pytest.mark.timeout(40)
def test_tx_clients_get_a_channel_without_proxy_confirms(proxy, tenant, queues):
    """A client that selects Tx gets a channel without confirm mode (the broker refuses both
    on one channel); its commit is its guarantee and it never sees an ack."""
    q = queues.declare(tenant)
    c = proxy.connect(tenant)
    ch = c.channel()
    ch.tx_select()
    ch.basic_publish("", q, b"tx-1")
    ch.tx_commit()
    ch.basic_publish("", q, b"tx-2")
    ch.tx_rollback()
    c.close()
    with direct(tenant) as dch:
        assert dch.queue_declare(q, passive=True).method.message_count == 1
    assert [b for b, _, _ in drain(tenant, q)] == [b"tx-1"]


@pytest.mark.timeout(40)
def test_hold_ends_with_a_clean_close(proxy_factory, fault_relay, tenant, queues):
    """Past --outbox-hold, a client still waiting for the broker gets 320, and new clients are
    refused as before; what they published stays in the outbox until the broker is back."""
    p = proxy_factory(
        "-t", "60", "--outbox-hold", "2", "--connect-timeout", "1", upstream=fault_relay.url
    )
    q = queues.declare(tenant)
    c = p.connect(tenant)
    c.channel().basic_publish("", q, b"warm")
    c.close()
    _settle(p, tenant)
    fault_relay.mode = "refuse"
    fault_relay.cut()
    c = p.connect(tenant)
    ch = c.channel()
    ch.basic_publish("", q, b"held")
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as ei:
        ch.queue_declare(q, passive=True)  # needs the broker: waits, then the hold ends
    assert ei.value.reply_code == 320
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        p.connect(tenant)
    fault_relay.mode = "forward"
    _settle(p, tenant)
    assert sorted(b for b, _, _ in drain(tenant, q)) == [b"held", b"warm"]


@pytest.mark.timeout(40)
def test_a_message_half_read_when_the_upstream_dies_goes_on_unseen(
    proxy_factory, fault_relay, tenant, queues
):
    """The race made to happen: a publisher without confirms has sent a message's method and
    header but not its body when the upstream connection is cut. Its channel waits for a new
    upstream (the outage hold) with the part it sent; the body completes the message there.
    The client sees no error (CloseOk, not 320) and the message arrives once, whole."""
    p = proxy_factory("-t", "60", upstream=fault_relay.url)
    q = queues.declare(tenant)
    raw = RawAMQP(p.host, p.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost)
        raw.open_channel(1)
        frames = raw.content_frames(1, "", q, b"whole-after-the-cut")
        body_at = len(frames) - (7 + len(b"whole-after-the-cut") + 1)
        raw.send_raw(frames[:body_at])  # Basic.Publish and the content header
        raw.open_channel(2)  # its OpenOk: the proxy has read everything sent before it
        fault_relay.cut()
        wait_for(lambda: "upstream connection lost" in p.log(), 5, message="the cut")
        raw.send_raw(frames[body_at:])
        raw.send(1, commands.Channel.Close(200, "bye", 0, 0))
        raw.expect(commands.Channel.CloseOk, 1, timeout=10)
    finally:
        raw.close()
    _settle(p, tenant)
    assert [b for b, _, _ in drain(tenant, q)] == [b"whole-after-the-cut"]
