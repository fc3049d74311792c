"""Upstream failure: when the upstream connection dies or the broker closes it, every client with
a channel on it gets Connection.Close promptly (320, or the broker's own code and text), the next
client gets a fresh upstream, and a broker that is down gives new clients a clean close, not a
hang.  Connection cuts go through a local fault relay, never the shared broker."""

from __future__ import annotations

import threading
import time
import uuid

import pika
import pytest
from support import (
    OUTBOX_MESSAGES,
    UPSTREAM_CONNECTIONS,
    UPSTREAM_CONNECTS,
    drain,
    free_port,
    list_connections,
    queue_counts,
    rabbitmqctl,
    reply_code_of,
    wait_for,
)


def _wait_closed(conns, since: float, timeout: float = 3.0):
    """Pump each pika connection until it raises; return {index: (elapsed, exception)}."""
    results: dict[int, tuple[float, BaseException]] = {}
    deadline = since + timeout
    while len(results) < len(conns) and time.monotonic() < deadline:
        for i, c in enumerate(conns):
            if i in results:
                continue
            try:
                c.process_data_events(time_limit=0.01)
            except Exception as exc:
                results[i] = (time.monotonic() - since, exc)
    return results


def _check_closed(results, n, code=320, within=1.0, text=None):
    assert len(results) == n, f"only {len(results)} of {n} clients were told (hang)"
    for i, (elapsed, exc) in sorted(results.items()):
        assert isinstance(exc, pika.exceptions.ConnectionClosedByBroker), (
            f"client {i}: expected Connection.Close from the proxy, got {exc!r}"
        )
        assert exc.reply_code == code, f"client {i}: {exc!r}"
        if text is not None:
            assert text in exc.reply_text, f"client {i}: {exc!r}"
        assert elapsed < within, f"client {i} told after {elapsed:.2f}s"


@pytest.mark.timeout(40)
def test_relay_cut_closes_confirm_clients_within_a_second_and_plain_publishers_carry_on(
    proxy_factory, fault_relay, tenant, queues
):
    """A client that selected confirms learns of the lost upstream at once (its unconfirmed
    messages are its own); publishers without confirms, whose messages the proxy answers
    for, carry on unaware on a new upstream connection (the outbox replays what was lost)."""
    p = proxy_factory("-t", "60", upstream=fault_relay.url)
    q = queues.declare(tenant)
    clients = [p.connect(tenant) for _ in range(3)]
    chans = [c.channel() for c in clients]
    chans[2].confirm_delivery()
    for ch in chans:
        ch.basic_publish("", q, b"before")
    assert fault_relay.connections == 1, "expected one shared upstream connection"
    p.wait_metric(OUTBOX_MESSAGES, 0, **tenant.labels)  # all confirmed: nothing to replay

    t0 = time.monotonic()
    assert fault_relay.cut() == 1
    _check_closed(_wait_closed([clients[2]], t0), 1)
    for i, ch in enumerate(chans[:2]):
        ch.basic_publish("", q, f"after-{i}".encode())
        clients[i].close()  # no error: the proxy kept their channels
    p.wait_metric(UPSTREAM_CONNECTIONS, 1, **tenant.labels)
    assert p.metric(UPSTREAM_CONNECTS, **tenant.labels) == 2

    nxt = p.connect(tenant)
    ch = nxt.channel()
    ch.confirm_delivery()
    ch.basic_publish("", q, b"next")
    nxt.close()
    wait_for(lambda: queue_counts(tenant, q)[0] == 6, 5)
    bodies = sorted(b for b, _, _ in drain(tenant, q))
    assert bodies == [b"after-0", b"after-1", b"before", b"before", b"before", b"next"]


@pytest.mark.timeout(40)
def test_relay_cut_releases_client_blocked_in_a_synchronous_call(
    proxy_factory, fault_relay, tenant, queues
):
    p = proxy_factory("-t", "60", upstream=fault_relay.url)
    q = queues.declare(tenant)
    c = p.connect(tenant)
    ch = c.channel()
    ch.queue_declare(q, passive=True)
    fault_relay.mode = "blackhole"  # from now on nothing reaches the broker: the RPC hangs
    t_cut: list[float] = []

    def cut() -> None:
        t_cut.append(time.monotonic())
        fault_relay.cut()

    timer = threading.Timer(0.5, cut)
    timer.start()
    try:
        with pytest.raises(pika.exceptions.AMQPError) as ei:
            ch.queue_declare(q, passive=True)
            c.process_data_events(time_limit=3)
    finally:
        timer.cancel()
    assert t_cut, "the call returned before the cut"
    elapsed = time.monotonic() - t_cut[0]
    assert isinstance(ei.value, pika.exceptions.ConnectionClosedByBroker), repr(ei.value)
    assert ei.value.reply_code == 320
    assert elapsed < 1.0, f"released {elapsed:.2f}s after the cut"


@pytest.mark.timeout(40)
def test_broker_close_connection_forwards_code_and_text(proxy, tenant, queues):
    """Clients that selected confirms get the broker's own Connection.Close; a publisher
    without confirms carries on (its channel moves to a new upstream connection)."""
    q = queues.declare(tenant)
    clients = [
        proxy.connect(tenant, client_properties={"connection_name": f"victim-{i}"})
        for i in range(3)
    ]
    chans = [c.channel() for c in clients]
    for ch in chans[:2]:
        ch.confirm_delivery()
    for ch in chans:
        ch.basic_publish("", q, b"x")
    proxy.wait_metric(OUTBOX_MESSAGES, 0, **tenant.labels)

    def upstreams():
        rows = list_connections("pid", "vhost", "user", "client_properties")
        return [
            r
            for r in rows
            if r.get("vhost") == tenant.vhost
            and "itest-direct" not in r.get("client_properties", "")
        ]

    ups = wait_for(
        lambda: upstreams() if len(upstreams()) == 1 else None,
        5,
        message="expected exactly one upstream connection for the tenant",
    )
    reason = f"itest-forced-{uuid.uuid4().hex[:6]}"
    rabbitmqctl("close_connection", ups[0]["pid"], reason)
    t0 = time.monotonic()
    results = _wait_closed(clients[:2], t0)
    _check_closed(results, 2, code=320, within=1.0, text=reason)
    chans[2].basic_publish("", q, b"plain-after")
    clients[2].close()

    nxt = proxy.connect(tenant)
    ch = nxt.channel()
    ch.confirm_delivery()
    ch.basic_publish("", q, b"after")
    nxt.close()
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 2
    wait_for(lambda: queue_counts(tenant, q)[0] == 5, 5)


@pytest.mark.timeout(40)
def test_broker_down_gives_clean_close_not_hang(proxy_factory, tenant):
    dead = f"amqp://127.0.0.1:{free_port()}"
    p = proxy_factory(
        "-t",
        "60",
        "--connect-timeout",
        "2",
        "--handshake-timeout",
        "2",
        upstream=dead,
        healthz=False,
    )
    for _ in range(2):
        t0 = time.monotonic()
        with pytest.raises(pika.exceptions.AMQPConnectionError) as ei:
            p.connect(tenant).close()
        elapsed = time.monotonic() - t0
        assert reply_code_of(ei.value) in (320, 503), f"not a clean AMQP close: {ei.value!r}"
        assert elapsed < 4, f"took {elapsed:.1f}s"
    assert p.alive


@pytest.mark.timeout(40)
def test_blackholed_broker_gives_clean_close_within_timeouts(proxy_factory, fault_relay, tenant):
    """Broker accepts TCP but never speaks: the upstream handshake times out, the client is told."""
    p = proxy_factory(
        "-t", "60", "--connect-timeout", "2", "--handshake-timeout", "2", upstream=fault_relay.url
    )
    fault_relay.mode = "blackhole"
    t0 = time.monotonic()
    with pytest.raises(pika.exceptions.AMQPConnectionError) as ei:
        p.connect(tenant).close()
    elapsed = time.monotonic() - t0
    assert reply_code_of(ei.value) in (320, 503), f"not a clean AMQP close: {ei.value!r}"
    assert elapsed < 7, f"took {elapsed:.1f}s"
    assert p.alive


@pytest.mark.timeout(40)
def test_broker_back_after_outage_serves_next_client(proxy_factory, fault_relay, tenant, queues):
    """Without the outage hold, a client that connects while the broker is unreachable gets a
    clean 320 (test_outbox.py covers the hold)."""
    q = queues.declare(tenant)
    p = proxy_factory(
        "-t", "60", "--connect-timeout", "2", "--outbox-hold", "0", upstream=fault_relay.url
    )
    c = p.connect(tenant)
    first = c.channel()
    first.confirm_delivery()  # "one" is at the broker before the relay is cut
    first.basic_publish("", q, b"one")
    fault_relay.mode = "refuse"
    fault_relay.cut()
    with pytest.raises(pika.exceptions.AMQPError):
        c.process_data_events(time_limit=2)
        c.channel()
    with pytest.raises(pika.exceptions.AMQPConnectionError) as ei:
        p.connect(tenant).close()
    assert reply_code_of(ei.value) in (320, 503), repr(ei.value)
    fault_relay.mode = "forward"
    c = p.connect(tenant)
    ch = c.channel()
    ch.confirm_delivery()
    ch.basic_publish("", q, b"two")
    c.close()
    assert [b for b, _, _ in drain(tenant, q)] == [b"one", b"two"]


@pytest.mark.timeout(40)
def test_only_clients_of_the_dead_upstream_are_closed(proxy_factory, fault_relay, tenant, queues):
    """With one channel per upstream, two clients of one pool sit on two upstream connections;
    killing one upstream closes its client only."""
    p = proxy_factory("-t", "60", "--max-upstream-channels", "1", upstream=fault_relay.url)
    q = queues.declare(tenant)
    a = p.connect(tenant)
    ach = a.channel()
    ach.confirm_delivery()  # at the broker before its upstream is cut
    ach.basic_publish("", q, b"a")
    wait_for(lambda: fault_relay.connections == 1, 3)
    b = p.connect(tenant)
    bch = b.channel()
    bch.confirm_delivery()
    bch.basic_publish("", q, b"b")
    wait_for(lambda: fault_relay.connections == 2, 3)

    t0 = time.monotonic()
    assert fault_relay.cut(only=0) == 1  # a's upstream (accepted first)
    _check_closed(_wait_closed([a], t0), 1)
    b.process_data_events(time_limit=0.5)
    assert b.is_open and bch.is_open, "a client on a healthy upstream was closed"
    bch.basic_publish("", q, b"b-after")
    b.close()
    assert sorted(x for x, _, _ in drain(tenant, q)) == [b"a", b"b", b"b-after"]


@pytest.mark.timeout(40)
def test_aio_pika_client_told_when_upstream_dies(proxy_factory, fault_relay, tenant, queues):
    import asyncio

    import aio_pika
    import aiormq

    p = proxy_factory("-t", "60", upstream=fault_relay.url)
    q = queues.declare(tenant)

    async def run() -> tuple[float, BaseException | None]:
        conn = await aio_pika.connect(p.url(tenant), timeout=10)
        closed: asyncio.Future = asyncio.get_running_loop().create_future()
        conn.close_callbacks.add(lambda _sender, exc: closed.done() or closed.set_result(exc))
        ch = await conn.channel()
        await ch.default_exchange.publish(aio_pika.Message(b"x"), q)
        t0 = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, fault_relay.cut)
        exc = await asyncio.wait_for(closed, 5)
        return time.monotonic() - t0, exc

    elapsed, exc = asyncio.run(run())
    assert elapsed < 1.0, f"aio-pika client told after {elapsed:.2f}s"
    # aiormq has no class for 320: ConnectionClosed(reply_code, reply_text)
    assert isinstance(exc, aiormq.exceptions.ConnectionClosed), repr(exc)
    assert exc.args[0] == 320, repr(exc)
