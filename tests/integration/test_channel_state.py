"""Channel state (confirm mode and its tags, tx, qos, consumers, unacked deliveries, exclusive
queues) never reaches the next client of a pooled channel."""

from __future__ import annotations

import socket
import struct
import time
import uuid

import pika
import pytest
from pamqp import commands
from pamqp import frame as pframe
from support import (
    CLIENT_CONNECTIONS,
    LEASED_CHANNELS,
    PARKED_CHANNELS,
    UPSTREAM_CHANNEL_OPENS,
    UPSTREAM_CONNECTS,
    direct,
    drain,
    list_connections,
    queue_counts,
    wait_for,
)
from support.raw import RawAMQP, is_heartbeat

ACKISH = (commands.Basic.Ack, commands.Basic.Nack)


def _raw(proxy, tenant) -> RawAMQP:
    raw = RawAMQP(proxy.host, proxy.port)
    raw.handshake(tenant.user, tenant.password, tenant.vhost)
    raw.open_channel(1)
    return raw


def _unexpected(frames, kinds):
    return [(c, type(v).__name__) for c, v in frames if isinstance(v, kinds)]


def _leave_parked_confirm_channel(proxy, tenant, q) -> None:
    """Client A: confirm mode, three confirmed publishes, leaves with all confirms delivered."""
    a = proxy.connect(tenant)
    ach = a.channel()
    ach.confirm_delivery()
    for i in range(3):
        ach.basic_publish("", q, f"a-{i}".encode())
    a.close()
    proxy.wait_metric(PARKED_CHANNELS, 1, **tenant.labels)


@pytest.mark.timeout(40)
def test_confirm_mode_does_not_leak_to_next_client(proxy, tenant, queues):
    q = queues.declare(tenant)
    _leave_parked_confirm_channel(proxy, tenant, q)
    # B gets the parked channel: no Channel.Open upstream
    b = _raw(proxy, tenant)
    try:
        assert proxy.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) == 1, "channel not reused"
        # without Confirm.Select, B must see no Basic.Ack for its publishes
        for i in range(3):
            b.publish(1, "", q, f"b-plain-{i}".encode())
        frames = b.frames_for(0.8)
        assert _unexpected(frames, ACKISH) == [], "client not in confirm mode received acks"
        # selecting confirm mode now: tags start at 1 as on a fresh channel
        b.rpc(1, commands.Confirm.Select(), commands.Confirm.SelectOk)
        b.publish(1, "", q, b"b-confirmed-1")
        ack = b.expect(commands.Basic.Ack, 1)
        assert ack.delivery_tag == 1 and not ack.multiple, (
            f"first confirm after Confirm.Select has tag {ack.delivery_tag}, expected 1"
        )
        b.publish(1, "", q, b"b-confirmed-2")
        ack = b.expect(commands.Basic.Ack, 1)
        assert ack.delivery_tag == 2
    finally:
        b.close()
    wait_for(lambda: queue_counts(tenant, q)[0] == 8, 5)


@pytest.mark.timeout(40)
def test_confirm_tags_restart_at_1_for_the_next_client(proxy, tenant, queues):
    q = queues.declare(tenant)
    _leave_parked_confirm_channel(proxy, tenant, q)
    c = _raw(proxy, tenant)
    try:
        assert proxy.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) == 1, "channel not reused"
        c.rpc(1, commands.Confirm.Select(), commands.Confirm.SelectOk)
        for expected_tag in (1, 2, 3):
            c.publish(1, "", q, f"c-{expected_tag}".encode())
            assert c.expect(commands.Basic.Ack, 1).delivery_tag == expected_tag
    finally:
        c.close()
    # and again for a third client (the channel is parked again, its tags went on upstream)
    proxy.wait_metric(PARKED_CHANNELS, 1, **tenant.labels)
    d = _raw(proxy, tenant)
    try:
        d.rpc(1, commands.Confirm.Select(), commands.Confirm.SelectOk)
        d.publish(1, "", q, b"d-1")
        assert d.expect(commands.Basic.Ack, 1).delivery_tag == 1
    finally:
        d.close()
    assert proxy.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) == 1
    wait_for(lambda: queue_counts(tenant, q)[0] == 7, 5)


@pytest.mark.timeout(40)
def test_client_leaving_with_pending_confirms_leaks_no_acks(proxy, tenant, queues):
    """A leaves right after firing many publishes in confirm mode (acks still in flight)."""
    q = queues.declare(tenant)
    a = _raw(proxy, tenant)
    a.rpc(1, commands.Confirm.Select(), commands.Confirm.SelectOk)
    a.send_raw(b"".join(a.content_frames(1, "", q, b"a-%d" % i) for i in range(300)))
    a.abort()
    b = _raw(proxy, tenant)
    try:
        frames = b.frames_for(1.0)
        assert _unexpected(frames, ACKISH) == [], "acks of the previous client leaked"
        b.rpc(1, commands.Confirm.Select(), commands.Confirm.SelectOk)
        b.publish(1, "", q, b"b-confirmed")
        ack = b.expect(commands.Basic.Ack, 1)
        assert ack.delivery_tag == 1 and not ack.multiple
    finally:
        b.close()
    wait_for(lambda: queue_counts(tenant, q)[0] == 301, 5)


@pytest.mark.timeout(40)
def test_tx_mode_does_not_leak_and_uncommitted_publish_is_dropped(proxy, tenant, queues):
    q = queues.declare(tenant)
    a = proxy.connect(tenant)
    ach = a.channel()
    ach.tx_select()
    ach.basic_publish("", q, b"a-uncommitted")
    a.close()  # leaves without commit: like a direct connection, the publish is rolled back

    b = proxy.connect(tenant)
    b.channel().basic_publish("", q, b"b-plain")  # not in tx mode: must arrive without commit
    wait_for(
        lambda: queue_counts(tenant, q)[0] >= 1,
        3,
        message="publish without tx never arrived (channel still in tx mode?)",
    )
    b.close()

    c = proxy.connect(tenant)
    cch = c.channel()
    cch.tx_select()
    cch.basic_publish("", q, b"c-tx")
    cch.tx_commit()
    c.close()
    wait_for(lambda: queue_counts(tenant, q)[0] >= 2, 3)
    time.sleep(0.2)
    assert [b for b, _, _ in drain(tenant, q)] == [b"b-plain", b"c-tx"]


@pytest.mark.timeout(40)
@pytest.mark.parametrize("global_qos", [False, True], ids=["per-consumer", "global"])
def test_qos_does_not_leak_to_next_client(proxy, tenant, queues, global_qos):
    q = queues.declare(tenant)
    a = proxy.connect(tenant)
    a.channel().basic_qos(prefetch_count=1, global_qos=global_qos)
    a.close()
    with direct(tenant) as ch:
        for i in range(20):
            ch.basic_publish("", q, f"m{i}".encode())
    wait_for(lambda: queue_counts(tenant, q)[0] == 20, 5)

    b = proxy.connect(tenant)
    try:
        bch = b.channel()
        got = []
        bch.basic_consume(q, lambda c, m, p, body: got.append(body), auto_ack=False)
        deadline = time.monotonic() + 3
        while len(got) < 20 and time.monotonic() < deadline:
            b.process_data_events(time_limit=0.1)
        assert len(got) == 20, f"only {len(got)} unacked deliveries: prefetch limit leaked"
    finally:
        b.close()
    wait_for(lambda: queue_counts(tenant, q) == (20, 0), 5)


@pytest.mark.timeout(40)
def test_consumer_does_not_survive_into_next_client(proxy, tenant, queues):
    q = queues.declare(tenant)
    a = proxy.connect(tenant)
    a.channel().basic_consume(q, lambda *args: None, auto_ack=True, consumer_tag="a-tag")
    assert queue_counts(tenant, q) == (0, 1)
    a.close()
    wait_for(lambda: queue_counts(tenant, q) == (0, 0), 5, message="A's consumer still upstream")

    b = _raw(proxy, tenant)
    try:
        with direct(tenant) as ch:
            for i in range(3):
                ch.basic_publish("", q, f"m{i}".encode())
        frames = b.frames_for(0.8)
        assert _unexpected(frames, (commands.Basic.Deliver,)) == [], "B got A's deliveries"
    finally:
        b.close()
    assert queue_counts(tenant, q) == (3, 0), "messages were consumed by a leaked consumer"


@pytest.mark.timeout(40)
def test_unacked_get_is_requeued_and_acks_after_reuse_hit_the_right_message(proxy, tenant, queues):
    q = queues.declare(tenant)
    with direct(tenant) as ch:
        for i in range(3):
            ch.basic_publish("", q, f"m{i}".encode())
    wait_for(lambda: queue_counts(tenant, q)[0] == 3, 5)

    # a no-ack get keeps the channel clean (parked); a manual-ack get left unacked makes it dirty
    a = proxy.connect(tenant)
    ach = a.channel()
    m, _, body = ach.basic_get(q, auto_ack=True)
    assert body == b"m0"
    m, _, body = ach.basic_get(q, auto_ack=False)
    assert body == b"m1"
    a.close()
    wait_for(lambda: queue_counts(tenant, q)[0] == 2, 5, message="unacked m1 not requeued")

    b = proxy.connect(tenant)
    try:
        bch = b.channel()
        got = {}
        for _ in range(2):
            m, _, body = bch.basic_get(q, auto_ack=False)
            assert m is not None
            got[body] = m
        assert got[b"m1"].redelivered is True
        assert got[b"m2"].redelivered is False
        for m in got.values():
            bch.basic_ack(m.delivery_tag)
        # a sync round trip: a wrong tag would have closed the channel with 406
        bch.queue_declare(q, passive=True)
    finally:
        b.close()
    time.sleep(0.3)
    assert queue_counts(tenant, q) == (0, 0)


@pytest.mark.timeout(40)
def test_no_ack_get_keeps_channel_clean_and_tags_work_after_reuse(proxy, tenant, queues):
    q = queues.declare(tenant)
    with direct(tenant) as ch:
        for i in range(4):
            ch.basic_publish("", q, f"m{i}".encode())
    wait_for(lambda: queue_counts(tenant, q)[0] == 4, 5)
    a = proxy.connect(tenant)
    ach = a.channel()
    for i in range(2):
        assert ach.basic_get(q, auto_ack=True)[2] == f"m{i}".encode()
    a.close()
    proxy.wait_metric(PARKED_CHANNELS, 1, **tenant.labels)
    b = proxy.connect(tenant)
    try:
        bch = b.channel()
        assert proxy.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) == 1
        m, _, body = bch.basic_get(q, auto_ack=False)
        assert body == b"m2"
        bch.basic_ack(m.delivery_tag)
        m, _, body = bch.basic_get(q, auto_ack=False)
        assert body == b"m3"
        bch.basic_nack(m.delivery_tag, requeue=False)
        bch.queue_declare(q, passive=True)  # would fail if a tag was wrong (406 closes channel)
        assert bch.is_open
    finally:
        b.close()
    time.sleep(0.3)
    assert queue_counts(tenant, q) == (0, 0)


@pytest.mark.timeout(40)
def _queue_gone(tenant, name: str) -> bool:
    """True once a passive declare of ``name`` on a direct connection gets 404."""
    with direct(tenant) as ch:
        try:
            ch.queue_declare(name, passive=True)
            return False
        except pika.exceptions.ChannelClosedByBroker as exc:
            return exc.reply_code == 404


def test_exclusive_queue_dies_with_its_client(proxy, tenant):
    a = proxy.connect(tenant)
    name = a.channel().queue_declare("", exclusive=True).method.queue
    with direct(tenant) as ch:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
            ch.queue_declare(name, passive=True)
        assert ei.value.reply_code == 405  # locked by its owner while A is connected
    a.close()
    wait_for(
        lambda: _queue_gone(tenant, name),
        5,
        interval=0.2,
        message=f"exclusive queue {name} outlived its client",
    )
    # and the pool still works
    b = proxy.connect(tenant)
    b.channel().queue_declare("", exclusive=True)
    b.close()
    # one publish and one consume connection (exclusive queues live with the consumers)
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 2


def _acked_tags(raw: RawAMQP, last_tag: int, timeout: float = 5.0) -> set[int]:
    """Collect confirms (single and multiple) until last_tag is covered; return acked tags."""
    acked: set[int] = set()
    deadline = time.monotonic() + timeout
    while last_tag not in acked:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"confirms missing; have {sorted(acked)}"
        _, ack = raw.read_until(lambda c, v: isinstance(v, ACKISH), remaining)[:2]
        assert isinstance(ack, commands.Basic.Ack), f"unexpected nack {ack!r}"
        if ack.multiple:  # everything up to and including this tag
            acked.update(range(1, ack.delivery_tag + 1))
        else:
            acked.add(ack.delivery_tag)
        assert max(acked) <= last_tag, f"ack for tag {ack.delivery_tag} > {last_tag}"
    return acked


@pytest.mark.timeout(40)
def test_multiple_confirms_are_translated_on_a_reused_channel(proxy, tenant, queues):
    """Bursts make the broker answer with multiple=True acks; on a reused channel their tags
    must still cover exactly 1..N of the new client."""
    q = queues.declare(tenant)
    for round_ in range(3):
        raw = _raw(proxy, tenant)
        try:
            raw.rpc(1, commands.Confirm.Select(), commands.Confirm.SelectOk)
            n = 200
            raw.send_raw(b"".join(raw.content_frames(1, "", q, b"r%d" % round_) for _ in range(n)))
            assert _acked_tags(raw, n) == set(range(1, n + 1))
        finally:
            raw.close()
    assert proxy.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) == 1
    wait_for(lambda: queue_counts(tenant, q)[0] == 600, 5)


@pytest.mark.timeout(40)
def test_return_then_ack_on_a_reused_confirm_channel(proxy, tenant, queues):
    q = queues.declare(tenant)
    _leave_parked_confirm_channel(proxy, tenant, q)
    raw = _raw(proxy, tenant)
    try:
        raw.rpc(1, commands.Confirm.Select(), commands.Confirm.SelectOk)
        raw.publish(1, "", "itest-unroutable", b"bounce", mandatory=True)
        ret = raw.expect(commands.Basic.Return, 1)
        assert ret.reply_code == 312 and ret.routing_key == "itest-unroutable"
        ack = raw.expect(commands.Basic.Ack, 1)
        assert ack.delivery_tag == 1
    finally:
        raw.close()


@pytest.mark.timeout(40)
def test_channel_numbers_reused_within_one_connection_share_one_upstream_channel(
    proxy, tenant, queues
):
    q = queues.declare(tenant)
    conn = proxy.connect(tenant)
    try:
        for i in range(20):
            ch = conn.channel()  # pika reuses the freed channel number
            ch.basic_publish("", q, f"msg-{i}".encode())
            ch.close()
            # parked once the broker confirmed the publish (settled), then leased again
            proxy.wait_metric(PARKED_CHANNELS, 1, **tenant.labels)
    finally:
        conn.close()
    wait_for(lambda: queue_counts(tenant, q)[0] == 20, 5)
    assert [b for b, _, _ in drain(tenant, q)] == [f"msg-{i}".encode() for i in range(20)]
    assert proxy.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) == 1


@pytest.mark.timeout(40)
def test_many_channels_map_to_the_right_queues_and_are_all_parked(proxy, tenant, queues):
    qs = [queues.declare(tenant) for _ in range(3)]
    for round_ in range(2):
        conn = proxy.connect(tenant)
        try:
            chans = [conn.channel() for _ in range(30)]
            for i, ch in enumerate(chans):
                ch.basic_publish("", qs[i % 3], f"{round_}-{ch.channel_number}".encode())
            # a synchronous call on each channel: replies must come back on the right channel
            for i, ch in enumerate(chans):
                assert ch.queue_declare(qs[i % 3], passive=True).method.queue == qs[i % 3]
        finally:
            conn.close()
        proxy.wait_metric(PARKED_CHANNELS, 30, **tenant.labels)
    assert proxy.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) == 30
    for k, q in enumerate(qs):
        bodies = [b.decode() for b, _, _ in drain(tenant, q)]
        assert len(bodies) == 20
        # every message was published on a client channel whose index maps to this queue
        assert all((int(b.split("-")[1]) - 1) % 3 == k for b in bodies), bodies


@pytest.mark.timeout(40)
@pytest.mark.parametrize("leave", ["channel-close", "connection-close", "tcp-close"])
def test_replies_in_flight_when_client_leaves_never_reach_the_next_client(
    proxy, tenant, queues, leave
):
    """A fires synchronous requests and leaves without waiting for the replies. Whatever the
    proxy does with that channel, the late replies (DeclareOk, GetOk + content) must not
    show up on the next client's channel."""
    q = queues.declare(tenant)
    q2 = queues.declare(tenant)
    with direct(tenant) as ch:
        for i in range(5):
            ch.basic_publish("", q, f"m{i}".encode())
    wait_for(lambda: queue_counts(tenant, q)[0] == 5, 5)

    for _ in range(3):
        a = _raw(proxy, tenant)
        burst = b"".join(
            pframe.marshal(m, 1)
            for m in (
                commands.Queue.Declare(queue=q, passive=True),
                commands.Basic.Get(queue=q, no_ack=True),
                commands.Exchange.Declare(
                    exchange="amq.direct", exchange_type="direct", passive=True
                ),
            )
        )
        if leave == "channel-close":
            a.send_raw(burst + pframe.marshal(commands.Channel.Close(200, "bye", 0, 0), 1))
            a.read_until(lambda c, v: isinstance(v, commands.Channel.CloseOk), 5)
            a.close()
        elif leave == "connection-close":
            a.send_raw(burst)
            a.close()
        else:
            a.send_raw(burst)
            a.abort()

        b = _raw(proxy, tenant)
        try:
            stray = [(c, type(v).__name__) for c, v in b.frames_for(0.5) if not is_heartbeat(v)]
            assert stray == [], f"next client received frames it never asked for: {stray}"
            ok = b.rpc(1, commands.Queue.Declare(queue=q2, passive=True), commands.Queue.DeclareOk)
            assert ok.queue == q2, f"got a reply for {ok.queue!r}, asked about {q2!r}"
        finally:
            b.close()


@pytest.mark.timeout(40)
def test_clients_vanishing_mid_channel_open_or_rpc_leak_no_leases(proxy, tenant, queues):
    """Clients that vanish while their Channel.Open or a synchronous call is in flight leave
    no lease behind, and the proxy's idea of its parked channels matches the broker's count of
    open channels on the upstream connection."""
    q = queues.declare(tenant)
    for i in range(20):
        raw = _raw(proxy, tenant) if i % 2 == 0 else RawAMQP(proxy.host, proxy.port)
        if i % 2 == 0:  # channel 1 open: vanish during a synchronous call
            raw.send(1, commands.Queue.Declare(queue=q, passive=True))
        else:  # vanish right after asking for a channel
            raw.handshake(tenant.user, tenant.password, tenant.vhost)
            raw.send(1, commands.Channel.Open())
        raw.abort()
    proxy.wait_metric(CLIENT_CONNECTIONS, 0, **tenant.labels)
    proxy.wait_metric(LEASED_CHANNELS, 0, **tenant.labels)

    def consistent() -> bool:
        rows = [
            r
            for r in list_connections("vhost", "channels", "client_properties")
            if r["vhost"] == tenant.vhost and "itest-direct" not in r.get("client_properties", "")
        ]
        broker_channels = sum(int(r["channels"]) for r in rows)
        return broker_channels == proxy.metric(PARKED_CHANNELS, **tenant.labels)

    wait_for(
        consistent,
        5,
        interval=0.3,
        message="parked_channels gauge differs from the broker's open channel count",
    )
    c = proxy.connect(tenant)
    ch = c.channel()
    ch.confirm_delivery()
    ch.basic_publish("", q, b"still-works")
    c.close()
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("named", [True, False], ids=["named", "server-named"])
def test_exclusive_queue_is_locked_for_other_clients_of_the_pool(proxy, tenant, named):
    """While its owner is connected, another client of the same pool (same upstream connection,
    where the broker itself would allow it) gets 405 RESOURCE_LOCKED for every operation on an
    exclusive queue, and its connection lives on; the owner keeps full use of it."""
    owner = proxy.connect(tenant)
    och = owner.channel()
    wanted = f"itest-excl-{uuid.uuid4().hex[:8]}" if named else ""
    name = och.queue_declare(wanted, exclusive=True).method.queue
    och.queue_bind(name, "amq.fanout")
    other = proxy.connect(tenant)
    attempts = {
        "declare": lambda ch: ch.queue_declare(name, exclusive=True),
        "passive declare": lambda ch: ch.queue_declare(name, passive=True),
        "bind": lambda ch: ch.queue_bind(name, "amq.direct", "k"),
        "unbind": lambda ch: ch.queue_unbind(name, "amq.fanout"),
        "consume": lambda ch: ch.basic_consume(name, lambda *a: None),
        "get": lambda ch: ch.basic_get(name),
        "purge": lambda ch: ch.queue_purge(name),
        "delete": lambda ch: ch.queue_delete(name),
    }
    for what, attempt in attempts.items():
        ch = other.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
            attempt(ch)
        assert ei.value.reply_code == 405, (what, ei.value)
        assert "RESOURCE_LOCKED" in ei.value.reply_text
    other.channel().basic_publish("", "amq.fanout-nothing", b"")  # still connected
    och.basic_publish("amq.fanout", "", b"to the owner")
    _method, _, body = och.basic_get(name, auto_ack=True)
    assert body == b"to the owner"
    och.queue_purge(name)
    other.close()
    owner.close()
    # the pool's two upstreams: publish, and consume (where the exclusive queue lives)
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 2


@pytest.mark.timeout(30)
def test_exclusive_queue_dies_with_a_killed_client(proxy, tenant):
    """A client that vanishes without Connection.Close (socket reset) loses its exclusive
    queues too, as on a direct connection."""
    raw = RawAMQP(proxy.host, proxy.port)
    raw.handshake(tenant.user, tenant.password, tenant.vhost)
    raw.open_channel(1)
    name = raw.rpc(1, commands.Queue.Declare(queue="", exclusive=True), commands.Queue.DeclareOk)
    name = name.queue
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.abort()
    wait_for(
        lambda: _queue_gone(tenant, name),
        5,
        interval=0.2,
        message=f"exclusive queue {name} outlived its killed client",
    )
