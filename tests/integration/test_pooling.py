"""Pooling: short-lived clients reuse one upstream connection and its parked upstream channels;
the proxy stays transparent (large bodies, properties, returns, broker channel errors)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import aio_pika
import pika
import pytest
from pamqp import commands
from pamqp import frame as pframe
from support import (
    CHANNEL_REUSES,
    CLIENT_CONNECTIONS,
    LEASED_CHANNELS,
    PARKED_CHANNELS,
    UPSTREAM_CHANNEL_OPENS,
    UPSTREAM_CONNECTIONS,
    UPSTREAM_CONNECTS,
    drain,
    queue_counts,
    wait_for,
    wire,
)
from support.raw import RawAMQP, RawConnectionClose

N = 50


def _assert_one_upstream_few_channels(proxy, tenant) -> None:
    """Sequential clients share one upstream connection and reuse its channels: a channel is
    parked once the broker confirmed its publish, and every one of them ends up parked."""
    m = proxy.metrics()
    lbl = tenant.labels
    assert m.get(UPSTREAM_CONNECTS, **lbl) == 1, (
        f"expected exactly one upstream connection opened for the pool, got "
        f"{m.get(UPSTREAM_CONNECTS, **lbl)}"
    )
    opens = m.get(UPSTREAM_CHANNEL_OPENS, **lbl)
    # How many channels are in rotation depends on the broker's confirm latency against the
    # client's cycle time (test_outbox.py forces both cases); every client got one of them.
    assert opens + m.get(CHANNEL_REUSES, **lbl) == N
    # once the last client is gone: nothing leased, every channel parked, one upstream
    proxy.wait_metric(CLIENT_CONNECTIONS, 0, timeout=3, **lbl)
    proxy.wait_metric(LEASED_CHANNELS, 0, timeout=3, **lbl)
    proxy.wait_metric(PARKED_CHANNELS, opens, timeout=3, **lbl)
    proxy.wait_metric(UPSTREAM_CONNECTIONS, 1, timeout=3, **lbl)


def _assert_each_once(tenant, queue: str, n: int = N) -> None:
    """Every message arrived, exactly once. Sequential clients may publish on different
    upstream channels (a channel is handed on only once the broker confirmed its publishes),
    and the broker does not order messages across channels: compare as sets."""
    wait_for(
        lambda: queue_counts(tenant, queue)[0] >= n,
        5,
        message=lambda: f"expected {n} messages in {queue}, have {queue_counts(tenant, queue)}",
    )
    bodies = sorted(b for b, _, _ in drain(tenant, queue))
    assert bodies == sorted(f"msg-{i}".encode() for i in range(n))


@pytest.mark.timeout(60)
def test_pika_50_short_lived_publishers_share_one_upstream_connection_and_its_channels(
    proxy, tenant, queues
):
    q = queues.declare(tenant)
    for i in range(N):
        conn = proxy.connect(tenant, client_properties={"connection_name": f"cycle-{i}"})
        ch = conn.channel()
        ch.basic_publish("", q, f"msg-{i}".encode())
        if i % 2:
            ch.close()  # explicit Channel.Close (answered locally) half of the time
        conn.close()
    _assert_each_once(tenant, q)
    _assert_one_upstream_few_channels(proxy, tenant)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("confirms", [True, False], ids=["confirms", "no-confirms"])
def test_aio_pika_50_short_lived_publishers_share_one_upstream_connection_and_its_channels(
    proxy, tenant, queues, confirms
):
    """With confirms aio-pika publishes mandatory (returns arrive before the acks, so the
    channel is clean when the client leaves); without confirms we publish non-mandatory
    (a mandatory publish without confirms may still get a Basic.Return: dirty by design)."""
    q = queues.declare(tenant)

    async def run() -> None:
        for i in range(N):
            conn = await aio_pika.connect(proxy.url(tenant), timeout=10)
            ch = await conn.channel(publisher_confirms=confirms)
            await asyncio.wait_for(
                ch.default_exchange.publish(
                    aio_pika.Message(f"msg-{i}".encode()), q, mandatory=confirms
                ),
                5,
            )
            await conn.close()

    asyncio.run(run())
    _assert_each_once(tenant, q)
    _assert_one_upstream_few_channels(proxy, tenant)


@pytest.mark.timeout(60)
def test_aio_pika_mandatory_publishes_without_confirms_all_arrive(proxy, tenant, queues):
    """Mandatory publish without confirms leaves the channel dirty (closed upstream when the
    client leaves); the completed publish must still be delivered, and the shared upstream
    connection must survive the channel closes."""
    q = queues.declare(tenant)

    async def run() -> None:
        for i in range(N):
            conn = await aio_pika.connect(proxy.url(tenant), timeout=10)
            ch = await conn.channel(publisher_confirms=False)
            await ch.default_exchange.publish(
                aio_pika.Message(f"msg-{i}".encode()), q, mandatory=True
            )
            await conn.close()

    asyncio.run(run())
    _assert_each_once(tenant, q)
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1


@pytest.mark.timeout(30)
def test_connection_close_keeps_upstream_and_client_gauges_follow_clients(proxy, tenant, queues):
    """Client Connection.Close is answered locally: the upstream stays; gauges track clients."""
    q = queues.declare(tenant)
    conns = [proxy.connect(tenant) for _ in range(3)]
    chans = [c.channel() for c in conns]
    proxy.wait_metric(CLIENT_CONNECTIONS, 3, **tenant.labels)
    proxy.wait_metric(LEASED_CHANNELS, 3, **tenant.labels)
    for i, ch in enumerate(chans):
        ch.basic_publish("", q, f"msg-{i}".encode())
    for c in conns:
        c.close()
    proxy.wait_metric(CLIENT_CONNECTIONS, 0, **tenant.labels)
    proxy.wait_metric(LEASED_CHANNELS, 0, **tenant.labels)
    proxy.wait_metric(PARKED_CHANNELS, 3, **tenant.labels)
    assert proxy.metric(UPSTREAM_CONNECTIONS, **tenant.labels) == 1
    wait_for(lambda: queue_counts(tenant, q)[0] == 3, 5)
    # three channels: no order between them
    assert sorted(b for b, _, _ in drain(tenant, q)) == [b"msg-0", b"msg-1", b"msg-2"]
    # the three parked channels serve the next three concurrent clients without Channel.Open
    conns = [proxy.connect(tenant) for _ in range(3)]
    for c in conns:
        c.channel().basic_publish("", q, b"again")
    for c in conns:
        c.close()
    assert proxy.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) == 3
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1
    wait_for(lambda: queue_counts(tenant, q)[0] == 3, 5)


@pytest.mark.timeout(30)
def test_large_message_and_properties_round_trip(proxy, tenant, queues):
    q = queues.declare(tenant)
    body = bytes(range(256)) * (3 * 4096 + 7)  # ~3 MiB, not a multiple of any frame size
    props = pika.BasicProperties(
        content_type="application/octet-stream",
        content_encoding="identity",
        headers={"x-int": 42, "x-str": "ä-unicode", "x-nested": {"a": [1, "b", True]}},
        delivery_mode=2,
        priority=7,
        correlation_id="corr-1",
        reply_to="reply-q",
        expiration="600000",
        message_id="mid-1",
        timestamp=1700000000,
        type="t",
        user_id=tenant.user,
        app_id="itest",
    )
    conn = proxy.connect(tenant, frame_max=8192)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", q, body, props)
        method, got_props, got = ch.basic_get(q, auto_ack=False)
        assert method is not None, "message not in queue"
        assert got == body
        for field in (
            "content_type",
            "content_encoding",
            "headers",
            "delivery_mode",
            "priority",
            "correlation_id",
            "reply_to",
            "expiration",
            "message_id",
            "timestamp",
            "type",
            "user_id",
            "app_id",
        ):
            assert getattr(got_props, field) == getattr(props, field), field
        ch.basic_ack(method.delivery_tag)
    finally:
        conn.close()


@pytest.mark.timeout(30)
def test_deliveries_are_split_to_the_clients_frame_max(proxy, tenant, queues):
    """A client that negotiated frame_max 4096 never gets a bigger frame (re-split bodies)."""
    q = queues.declare(tenant)
    body = b"z" * (512 * 1024 + 3)
    conn = proxy.connect(tenant)
    conn.channel().basic_publish("", q, body)
    conn.close()
    wait_for(lambda: queue_counts(tenant, q)[0] == 1, 5)

    raw = RawAMQP(proxy.host, proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost, frame_max=4096)
        assert raw.frame_max == 4096
        raw.open_channel(1)
        raw.send(1, commands.Basic.Get(queue=q, no_ack=True))
        raw.expect(commands.Basic.GetOk, 1)
        hdr = raw.read_until(lambda c, v: c == 1 and hasattr(v, "body_size"))[1]
        assert hdr.body_size == len(body)
        got = b""
        while len(got) < len(body):
            _, frame = raw.read_frame(5)
            assert raw.last_frame_size <= 4096, f"frame of {raw.last_frame_size} bytes > 4096"
            got += frame.value
        assert got == body
    finally:
        raw.close()


@pytest.mark.timeout(30)
def test_mandatory_unroutable_publish_is_returned(proxy, tenant):
    conn = proxy.connect(tenant)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        with pytest.raises(pika.exceptions.UnroutableError):
            ch.basic_publish("", "no-such-queue-anywhere", b"x", mandatory=True)
        ch.basic_publish("", "no-such-queue-anywhere", b"y")  # not mandatory: just confirmed
    finally:
        conn.close()


@pytest.mark.timeout(30)
def test_broker_channel_error_reaches_client_and_spares_the_shared_upstream(proxy, tenant, queues):
    """404 on a publish to a missing exchange closes only that channel; frames the client sends
    after the broker's Channel.Close must not reach the broker (that would be a connection
    error on the shared upstream). A bystander on the same pool keeps working."""
    q = queues.declare(tenant)
    bystander = proxy.connect(tenant)
    bch = bystander.channel()
    bch.basic_publish("", q, b"before")

    raw = RawAMQP(proxy.host, proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost)
        raw.open_channel(1)
        burst = raw.content_frames(1, "no-such-exchange", "k", b"boom")
        burst += b"".join(raw.content_frames(1, "", q, b"late-%d" % i) for i in range(50))
        raw.send_raw(burst)
        close = raw.expect(commands.Channel.Close, 1)
        assert close.reply_code == 404
        # more frames on the closing channel: must be discarded, not forwarded
        raw.publish(1, "", q, b"after-close")
        raw.send(1, commands.Channel.CloseOk())
        raw.open_channel(1)
        raw.publish(1, "", q, b"reopened")
        raw.rpc(1, commands.Queue.Declare(queue=q, passive=True), commands.Queue.DeclareOk)
    finally:
        raw.close()

    bch.basic_publish("", q, b"after")
    bystander.process_data_events(0.2)
    assert bystander.is_open and bch.is_open
    bystander.close()
    bodies = [b for b, _, _ in drain(tenant, q)]
    assert b"before" in bodies and b"after" in bodies and b"reopened" in bodies
    assert b"after-close" not in bodies
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1, "shared upstream was killed"


@pytest.mark.timeout(30)
def test_channel_closed_by_broker_is_not_parked(proxy, tenant, queues):
    q = queues.declare(tenant)
    conn = proxy.connect(tenant)
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
        ch.queue_declare("does-not-exist", passive=True)
    assert ei.value.reply_code == 404
    # the connection is still usable
    ch2 = conn.channel()
    ch2.queue_declare(q, passive=True)
    conn.close()
    assert proxy.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) == 2
    # only the clean channel is parked; the broker-closed one is never handed out again
    proxy.wait_metric(PARKED_CHANNELS, 1, **tenant.labels)
    c2 = proxy.connect(tenant)
    c2.channel().queue_declare(q, passive=True)
    c2.close()
    assert proxy.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) == 2
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1


@pytest.mark.timeout(30)
def test_max_upstream_channels_opens_more_upstream_connections(
    module_proxy_factory, tenant, queues
):
    p = module_proxy_factory("-t", "60", "--max-upstream-channels", "2")
    q = queues.declare(tenant)
    conns = [p.connect(tenant) for _ in range(3)]
    try:
        chans = [c.channel() for c in conns]
        for i, ch in enumerate(chans):
            ch.basic_publish("", q, f"msg-{i}".encode())
        p.wait_metric(UPSTREAM_CONNECTIONS, 2, **tenant.labels)
        # one client with several channels is spread too
        extra = [conns[0].channel() for _ in range(2)]
        for ch in extra:
            ch.basic_publish("", q, b"extra")
        p.wait_metric(UPSTREAM_CONNECTIONS, 3, **tenant.labels)
    finally:
        for c in conns:
            c.close()
    wait_for(lambda: queue_counts(tenant, q)[0] == 5, 5)


@pytest.mark.timeout(30)
def test_concurrent_clients_do_not_mix_replies(proxy, tenant, queues):
    """Several threads doing RPC-style work at once: each gets its own answers."""
    qs = [queues.declare(tenant) for _ in range(4)]
    errors: list[BaseException] = []

    def worker(idx: int) -> None:
        try:
            for j in range(15):
                conn = proxy.connect(tenant)
                ch = conn.channel()
                ch.basic_publish("", qs[idx], f"{idx}-{j}".encode())
                ok = ch.queue_declare(qs[idx], passive=True)
                assert ok.method.queue == qs[idx]
                _method, _, body = ch.basic_get(qs[idx], auto_ack=True)
                assert body == f"{idx}-{j}".encode(), (idx, j, body)
                conn.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(25)
    assert not errors, errors
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1


@pytest.mark.timeout(20)
def test_wrong_protocol_header_gets_091_header_back(proxy):
    raw = RawAMQP(proxy.host, proxy.port)
    try:
        raw.send_raw(b"AMQP\x01\x01\x00\x0a")
        _ch, value = raw.read_frame(5)
        assert bytes(value) == b"AMQP\x00\x00\x09\x01"
    finally:
        raw.abort()


@pytest.mark.timeout(20)
def test_connection_start_mirrors_the_broker(proxy, tenant):
    direct_raw = RawAMQP("127.0.0.1", 5672)
    via = RawAMQP(proxy.host, proxy.port)
    try:
        direct_raw.send_raw(b"AMQP\x00\x00\x09\x01")
        d = direct_raw.expect(commands.Connection.Start, 0)
        via.send_raw(b"AMQP\x00\x00\x09\x01")
        v = via.expect(commands.Connection.Start, 0)
        assert set(v.mechanisms.split()) >= {"PLAIN", "AMQPLAIN"}
        for key in ("product", "version", "capabilities"):
            assert v.server_properties.get(key) == d.server_properties.get(key), key
    finally:
        direct_raw.abort()
        via.abort()


@pytest.mark.timeout(20)
def test_amqplain_login_works(proxy, tenant, queues):
    q = queues.declare(tenant)
    raw = RawAMQP(proxy.host, proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost, mechanism="AMQPLAIN")
        raw.open_channel(1)
        raw.rpc(1, commands.Confirm.Select(), commands.Confirm.SelectOk)
        raw.publish(1, "", q, b"amqplain")
        raw.expect(commands.Basic.Ack, 1)
    finally:
        raw.close()
    assert [b for b, _, _ in drain(tenant, q)] == [b"amqplain"]


@pytest.mark.timeout(20)
def test_amqplain_wrong_password_refused(proxy, tenant):
    raw = RawAMQP(proxy.host, proxy.port)
    try:
        with pytest.raises(RawConnectionClose) as ei:
            raw.handshake(tenant.user, "wrong", tenant.vhost, mechanism="AMQPLAIN")
        assert ei.value.reply_code == 403
    finally:
        raw.abort()


@pytest.mark.timeout(40)
def test_no_park_channels_opens_a_channel_per_client_but_keeps_the_connection(
    module_proxy_factory, tenant, queues
):
    p = module_proxy_factory("-t", "60", "--no-park-channels")
    q = queues.declare(tenant)
    for i in range(10):
        c = p.connect(tenant)
        c.channel().basic_publish("", q, f"msg-{i}".encode())
        c.close()
    _assert_each_once(tenant, q, 10)
    assert p.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1
    assert p.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) == 10
    p.wait_metric(PARKED_CHANNELS, 0, **tenant.labels)


@pytest.mark.timeout(40)
def test_async_channel_error_after_client_left_is_logged_and_channel_not_reused(
    proxy, tenant, queues
):
    """Fire-and-forget publish to a missing exchange, Channel.Close and Connection.Close in
    one write: the 404 arrives after the client is gone. The proxy logs it with the client's
    identity, does not hand that channel to anyone, and the shared upstream survives."""
    q = queues.declare(tenant)
    raw = RawAMQP(proxy.host, proxy.port)
    raw.handshake(tenant.user, tenant.password, tenant.vhost)
    raw.open_channel(1)
    raw.send_raw(
        raw.content_frames(1, "itest-no-such-exchange", "k", b"lost")
        + pframe.marshal(commands.Channel.Close(200, "bye", 0, 0), 1)
        + pframe.marshal(commands.Connection.Close(200, "bye", 0, 0), 0)
    )
    raw.read_until(lambda c, v: isinstance(v, commands.Connection.CloseOk), 5)
    raw.abort()
    client = f"{tenant.user}@{tenant.vhost}"  # the user is shared by every test's tenant
    wait_for(
        lambda: any("404" in ln and client in ln for ln in proxy.log().splitlines()),
        3,
        message="404 after the client left was not logged with the client's identity",
    )
    for i in range(3):
        c = proxy.connect(tenant)
        c.channel().basic_publish("", q, f"msg-{i}".encode())
        c.close()
    _assert_each_once(tenant, q, 3)
    mine = "\n".join(ln for ln in proxy.log().splitlines() if tenant.vhost in ln)
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1, mine
    # the first channel died with the 404 and was never handed on: new ones serve the rest
    assert 2 <= proxy.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) <= 4


@pytest.mark.timeout(40)
def test_pika_close_racing_a_broker_channel_error_does_not_kill_the_connection(proxy, tenant):
    """pika closes its channels on connection.close(); when the broker's asynchronous 404
    crosses that Channel.Close, a broker answers CloseOk and carries on. Against RabbitMQ
    directly this never raises; through the proxy it must not either."""
    for _ in range(60):  # a race: one iteration hits it only now and then
        c = proxy.connect(tenant)
        c.channel().basic_publish("itest-no-such-exchange", "k", b"lost")
        c.close()  # raises ConnectionClosedByBroker if the proxy kills the connection
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1


@pytest.mark.timeout(20)
def test_crossing_channel_close_is_answered_like_the_broker(proxy, tenant):
    """Deterministic form of the race: the client sends Channel.Close after the broker's
    Channel.Close(404) was sent to it, then CloseOk. RabbitMQ answers CloseOk and the
    connection stays usable."""
    raw = RawAMQP(proxy.host, proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost)
        raw.open_channel(1)
        raw.publish(1, "itest-no-such-exchange", "k", b"x")
        assert raw.expect(commands.Channel.Close, 1).reply_code == 404
        raw.send(1, commands.Channel.Close(200, "bye", 0, 0))
        raw.send(1, commands.Channel.CloseOk())
        raw.open_channel(1)
        raw.rpc(
            1,
            commands.Exchange.Declare(exchange="amq.direct", exchange_type="direct", passive=True),
            commands.Exchange.DeclareOk,
        )
    finally:
        raw.close()


@pytest.mark.timeout(30)
def test_empty_bodies_both_ways_and_on_a_reused_channel(proxy, tenant, queues):
    """A message with body_size 0 has no body frame: the proxy's whole-message tracking must
    see it complete (else the channel is wedged or the next publish is mangled)."""
    q = queues.declare(tenant)
    for round_ in range(3):
        c = proxy.connect(tenant)
        ch = c.channel()
        ch.basic_publish("", q, b"", pika.BasicProperties(message_id=f"empty-{round_}"))
        ch.basic_publish("", q, f"full-{round_}".encode())
        c.close()
        proxy.wait_metric(PARKED_CHANNELS, 1, **tenant.labels)  # settled: the next round reuses it
    assert proxy.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) == 1
    wait_for(lambda: queue_counts(tenant, q)[0] == 6, 5)
    c = proxy.connect(tenant)
    try:
        ch = c.channel()
        got = []
        for _ in range(6):
            m, props, body = ch.basic_get(q, auto_ack=True)
            assert m is not None
            got.append((props.message_id, body))
        assert got == [
            x for r in range(3) for x in ((f"empty-{r}", b""), (None, f"full-{r}".encode()))
        ]
    finally:
        c.close()


@pytest.mark.timeout(30)
def test_body_in_many_small_frames_from_a_small_frame_max_client(proxy, tenant, queues):
    q = queues.declare(tenant)
    body = bytes(range(256)) * 2048  # 512 KiB in ~128 frames of 4 KiB
    raw = RawAMQP(proxy.host, proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost, frame_max=4096)
        raw.open_channel(1)
        raw.rpc(1, commands.Confirm.Select(), commands.Confirm.SelectOk)
        for _ in range(3):
            raw.publish(1, "", q, body)
        acked: set[int] = set()
        while acked != {1, 2, 3}:
            ack = raw.expect(commands.Basic.Ack, 1)
            assert ack.delivery_tag <= 3, ack.delivery_tag
            acked |= set(range(1, ack.delivery_tag + 1)) if ack.multiple else {ack.delivery_tag}
    finally:
        raw.close()
    msgs = drain(tenant, q)
    assert [b for b, _, _ in msgs] == [body] * 3


@pytest.mark.timeout(90)
@pytest.mark.parametrize("scanner", ["compiled", "pure Python"])
def test_streams_through_both_frame_scanners(proxy_factory, tenant, queues, scanner):
    """Runs of plain frames are walked by the C scanner or its pure-Python twin
    (AMQPROXY_PURE_PYTHON_SCANNER=1): both forward the same streams, on a channel with the
    same upstream id and on one renumbered upstream, with confirms, acks and big bodies."""
    env = {"AMQPROXY_PURE_PYTHON_SCANNER": "1"} if scanner == "pure Python" else None
    proxy = proxy_factory(env=env)
    assert wait_for(lambda: f"frame scanner: {scanner}" in proxy.log(), 5)
    q = queues.declare(tenant)
    first, second = proxy.connect(tenant), proxy.connect(tenant)
    try:
        # second's channel 1 rides upstream channel 2 while first holds upstream channel 1
        chans = [first.channel(), second.channel()]
        for ch in chans:
            ch.confirm_delivery()
        sent = []
        for i in range(300):
            body = f"{i}-".encode() + (b"x" * 200_000 if i % 100 == 7 else b"y" * 50)
            chans[i % 2].basic_publish("", q, body)
            sent.append(body)
        consumer = chans[1]
        consumer.basic_qos(prefetch_count=50)
        got = []
        for method, _, body in consumer.consume(q, inactivity_timeout=5):
            if method is None:
                break
            got.append(body)
            consumer.basic_ack(method.delivery_tag)
            if len(got) == len(sent):
                break
        consumer.cancel()
    finally:
        first.close()
        second.close()
    assert sorted(got) == sorted(sent)
    assert [b for b in got if b.startswith(b"1-")] == [sent[1]]  # one copy each, whole
    assert queue_counts(tenant, q)[0] == 0
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1


@pytest.mark.timeout(60)
def test_a_cold_burst_behind_a_slow_link_logs_in_once_and_keeps_one_upstream_connection(
    proxy_factory, tenant, queues, fault_relay
):
    """Clients that arrive together at a cold pool need their password checked by the broker
    (at StartOk): the first client's login checks it for all that arrive while it is under
    way, and its connection serves the pool. Behind a 50 ms link every client arrives while
    that login is still opening: not one login per client (the broker's connection churn),
    and not one upstream connection kept per client."""
    fault_relay.delay = 0.025  # each way: the broker 50 ms away
    p = proxy_factory(upstream=fault_relay.url)
    q = queues.declare(tenant)
    before = fault_relay.accepted_total
    clients, errors = 20, []
    start = threading.Barrier(clients)

    def publish(i: int) -> None:
        try:
            start.wait(10)
            conn = p.connect(tenant)
            conn.channel().basic_publish("", q, f"msg-{i}".encode())
            conn.close()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    _assert_each_once(tenant, q, clients)
    lbl = tenant.labels
    # the first client's login, and at most one more that clients whose Open came first made
    assert fault_relay.accepted_total - before <= 2, fault_relay.accepted_total - before
    assert p.metrics().get(UPSTREAM_CONNECTS, **lbl) <= 2
    p.wait_metric(UPSTREAM_CONNECTIONS, 1, timeout=5, **lbl)
    wait_for(
        lambda: fault_relay.connections == 1,
        5,
        message=lambda: f"{fault_relay.connections} upstream connections through the relay",
    )


@pytest.mark.timeout(60)
def test_a_burst_with_a_wrong_password_is_refused_for_every_client(
    proxy_factory, tenant, fault_relay
):
    """The shared check's refusal is each waiting client's: every one gets ACCESS_REFUSED, and
    the broker is asked once or twice, not once per client."""
    fault_relay.delay = 0.025
    p = proxy_factory(upstream=fault_relay.url)
    wrong = dataclasses.replace(tenant, password="not-the-password")
    clients, outcomes = 10, []
    start = threading.Barrier(clients)
    before = fault_relay.accepted_total

    def attempt() -> None:
        start.wait(10)
        try:
            p.connect(wrong).close()
            outcomes.append("connected")
        except pika.exceptions.ProbableAuthenticationError:
            outcomes.append("refused")
        except Exception as exc:  # reported below
            outcomes.append(repr(exc))

    threads = [threading.Thread(target=attempt) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcomes == ["refused"] * clients
    assert fault_relay.accepted_total - before <= 2, fault_relay.accepted_total - before


@pytest.mark.timeout(60)
def test_an_open_that_overtakes_the_checking_clients_open_still_leaves_one_connection(
    proxy_factory, tenant, queues, fault_relay
):
    """Forced order: client A's StartOk starts the broker's check, client B's StartOk waits
    for it; B then sends its Open first (a new connection proves the vhost) while A holds its
    Open back until B's proof is under way (A's login then finishes too). Both proofs are
    open at about the same time: exactly one joins the pool, and both clients publish."""
    fault_relay.delay = 0.025
    p = proxy_factory(upstream=fault_relay.url)
    q = queues.declare(tenant)
    a, b = RawAMQP(p.host, p.port), RawAMQP(p.host, p.port)
    try:
        for raw in (a, b):
            raw.send_raw(wire.PROTOCOL_HEADER)
            raw.expect(commands.Connection.Start, 0)
        for raw in (a, b):  # A's check goes upstream; B's waits for it
            raw.send_raw(wire.start_ok(tenant.user, tenant.password))
        for raw in (a, b):
            tune = raw.expect(commands.Connection.Tune, 0)
            raw.send_raw(wire.tune_ok(tune.channel_max, tune.frame_max, 0))
        b.send_raw(wire.open_vhost(tenant.vhost.encode()))
        time.sleep(0.03)  # B's proof is connecting through the 50 ms link
        a.send_raw(wire.open_vhost(tenant.vhost.encode()))
        for raw, name in ((b, b"from-b"), (a, b"from-a")):
            raw.expect(commands.Connection.OpenOk, 0)
            raw.open_channel(1)
            raw.publish(1, "", q, name)
            raw.rpc(1, commands.Channel.Close(200, "bye", 0, 0), commands.Channel.CloseOk)
    finally:
        a.close()
        b.close()
    wait_for(lambda: queue_counts(tenant, q)[0] == 2, 5)  # the outbox's way behind 50 ms
    assert sorted(body for body, _, _ in drain(tenant, q)) == [b"from-a", b"from-b"]
    p.wait_metric(UPSTREAM_CONNECTIONS, 1, timeout=5, **tenant.labels)
    assert wait_for(lambda: fault_relay.connections == 1, 5)
