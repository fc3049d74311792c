"""Heartbeats are per leg and owned by the proxy: idle clients and idle parked upstreams survive;
a silent client is declared dead after 2*H."""

from __future__ import annotations

import time

import pika
import pytest
from pamqp import commands
from pamqp import heartbeat as pheartbeat
from support import (
    PARKED_CHANNELS,
    UPSTREAM_CHANNEL_OPENS,
    UPSTREAM_CONNECTIONS,
    UPSTREAM_CONNECTS,
    direct,
    drain,
    list_connections,
    queue_counts,
    wait_for,
)
from support.raw import RawAMQP, RawClosed, RawConnectionClose


@pytest.mark.timeout(40)
def test_pika_client_with_heartbeat_2_survives_10s_idle(proxy, tenant, queues):
    q = queues.declare(tenant)
    conn = proxy.connect(tenant, heartbeat=2)
    try:
        assert conn._impl.params.heartbeat == 2, "heartbeat 2 was not negotiated"
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", q, b"before-idle")
        conn.sleep(10)  # services the connection (pika sends its own heartbeats)
        assert conn.is_open and ch.is_open
        ch.basic_publish("", q, b"after-idle")
    finally:
        if conn.is_open:
            conn.close()
    assert [b for b, _, _ in drain(tenant, q)] == [b"before-idle", b"after-idle"]
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1


@pytest.mark.timeout(30)
def test_proxy_sends_heartbeats_to_an_idle_client(proxy, tenant):
    raw = RawAMQP(proxy.host, proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost, heartbeat=1)
        received = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            raw.send(0, pheartbeat.Heartbeat())
            for _, v in raw.frames_for(0.4):
                if isinstance(v, pheartbeat.Heartbeat):
                    received += 1
                elif isinstance(v, commands.Connection.Close):
                    pytest.fail(f"proxy closed a client that sends heartbeats: {v.reply_text}")
        assert received >= 3, f"only {received} heartbeats from the proxy in 4s with H=1"
        raw.open_channel(1)  # still usable
    finally:
        raw.close()


@pytest.mark.timeout(30)
def test_silent_client_is_dropped_after_two_heartbeat_intervals(proxy, tenant):
    raw = RawAMQP(proxy.host, proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost, heartbeat=1)
        raw.open_channel(1)
        t0 = time.monotonic()
        with pytest.raises((RawClosed, RawConnectionClose)):
            raw.read_until(lambda c, v: False, timeout=8)
        elapsed = time.monotonic() - t0
        assert 1.0 <= elapsed <= 5.0, f"silent client dropped after {elapsed:.1f}s (H=1)"
    finally:
        raw.abort()
    proxy.wait_metric("amqproxy_client_connections", 0, **tenant.labels)


@pytest.mark.timeout(60)
def test_idle_parked_upstream_and_quiet_consumer_survive_short_broker_heartbeat(
    proxy_factory, tenant_factory, queues
):
    p = proxy_factory("-t", "60", "--upstream-heartbeat", "2")
    parked_t = tenant_factory()
    consumer_t = tenant_factory()
    q_parked = queues.declare(parked_t)
    q_cons = queues.declare(consumer_t)

    # a parked upstream: one client published and left
    c = p.connect(parked_t)
    c.channel().basic_publish("", q_parked, b"one")
    c.close()
    p.wait_metric(PARKED_CHANNELS, 1, **parked_t.labels)

    # a quiet consumer without client heartbeats
    cons = p.connect(consumer_t, heartbeat=0)
    cch = cons.channel()
    got: list[bytes] = []
    cch.basic_consume(q_cons, lambda ch, m, pr, body: got.append(body), auto_ack=True)

    timeouts = {
        r["vhost"]: r["timeout"]
        for r in list_connections("vhost", "timeout", "client_properties")
        if r["vhost"] in (parked_t.vhost, consumer_t.vhost)
        and "itest-direct" not in r.get("client_properties", "")
    }
    assert timeouts == {parked_t.vhost: "2", consumer_t.vhost: "2"}, (
        f"broker-side heartbeat of the proxy's upstream connections: {timeouts}"
    )

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cons.process_data_events(time_limit=0.5)
    assert got == []

    # the parked upstream is the same connection, and its parked channel is reused
    assert p.metric(UPSTREAM_CONNECTS, **parked_t.labels) == 1
    assert p.metric(UPSTREAM_CONNECTIONS, **parked_t.labels) == 1
    c = p.connect(parked_t)
    c.channel().basic_publish("", q_parked, b"two")
    c.close()
    assert p.metric(UPSTREAM_CONNECTS, **parked_t.labels) == 1
    assert p.metric(UPSTREAM_CHANNEL_OPENS, **parked_t.labels) == 1
    wait_for(lambda: queue_counts(parked_t, q_parked)[0] == 2, 5)

    # the quiet consumer still receives
    with direct(consumer_t) as ch:
        ch.basic_publish("", q_cons, b"wake-up")
    deadline = time.monotonic() + 3
    while not got and time.monotonic() < deadline:
        cons.process_data_events(time_limit=0.1)
    assert got == [b"wake-up"]
    assert cons.is_open
    cons.close()
    # its publish connection and the consume connection its channel moved to, never again
    assert p.metric(UPSTREAM_CONNECTS, **consumer_t.labels) == 2


@pytest.mark.timeout(30)
def test_busy_publisher_still_gets_heartbeats(proxy, tenant, queues):
    """A client that only publishes (no confirms) gets nothing back from the broker; the proxy
    must still send it heartbeats, because liveness is per leg (a Java client would drop the
    connection otherwise)."""
    q = queues.declare(tenant)
    raw = RawAMQP(proxy.host, proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost, heartbeat=1)
        raw.open_channel(1)
        received = 0
        sent = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            raw.publish(1, "", q, b"busy")
            sent += 1
            for _, v in raw.frames_for(0.05):
                if isinstance(v, pheartbeat.Heartbeat):
                    received += 1
                elif isinstance(v, commands.Connection.Close):
                    pytest.fail(f"proxy closed a busy publisher: {v.reply_text}")
        assert received >= 3, f"only {received} heartbeats in 4s (H=1) while publishing"
    finally:
        raw.close()
    wait_for(lambda: queue_counts(tenant, q)[0] == sent, 5)


@pytest.mark.timeout(40)
def test_silent_upstream_is_declared_dead_and_its_clients_closed(
    proxy_factory, fault_relay, tenant, queues
):
    """The network path to the broker goes silent (no FIN, no RST). With an upstream heartbeat
    of 1 s the proxy must declare the upstream dead after ~2 s and close its clients with 320;
    the next client gets a fresh upstream."""
    q = queues.declare(tenant)
    p = proxy_factory("-t", "60", "--upstream-heartbeat", "1", upstream=fault_relay.url)
    c = p.connect(tenant, heartbeat=0)  # client heartbeats off: only the upstream leg notices
    ch = c.channel()
    ch.confirm_delivery()
    ch.basic_publish("", q, b"before")
    fault_relay.mode = "freeze"
    t0 = time.monotonic()
    exc = None
    while time.monotonic() - t0 < 8:
        try:
            c.process_data_events(time_limit=0.05)
        except Exception as e:
            exc = e
            break
    elapsed = time.monotonic() - t0
    assert exc is not None, "client never told that its upstream went silent"
    assert isinstance(exc, pika.exceptions.ConnectionClosedByBroker), repr(exc)
    assert exc.reply_code == 320
    assert 1.0 <= elapsed <= 4.5, f"silent upstream declared dead after {elapsed:.1f}s (H=1)"

    fault_relay.mode = "forward"
    c = p.connect(tenant)
    ch = c.channel()
    ch.confirm_delivery()
    ch.basic_publish("", q, b"after")
    c.close()
    assert p.metric(UPSTREAM_CONNECTS, **tenant.labels) == 2
    assert [b for b, _, _ in drain(tenant, q)] == [b"before", b"after"]


@pytest.mark.timeout(40)
def test_upstream_heartbeat_is_short_by_default_or_the_brokers_when_asked(
    proxy_factory, tenant_factory
):
    """A shared upstream must notice a dead path quickly: 6 s by default (the broker proposes
    60); `--upstream-heartbeat broker` takes the broker's proposal."""
    for args, expected in ((), "6"), (("--upstream-heartbeat", "broker"), "60"):
        tenant = tenant_factory()
        p = proxy_factory("-t", "60", *args)
        c = p.connect(tenant)

        def timeouts(vhost: str = tenant.vhost) -> list[str]:
            return [r["timeout"] for r in list_connections("vhost", "timeout", "client_properties")
                    if r["vhost"] == vhost and "amqproxy" in r["client_properties"]]  # fmt: skip

        assert wait_for(lambda: timeouts(), 10) == [expected]
        c.close()
        p.stop()
