"""Channel state (confirm mode and its tags, tx, qos, consumers, unacked deliveries, exclusive
queues) never reaches the next client of a pooled channel."""

from __future__ import annotations

import time

import pika
import pytest
from pamqp import commands

from conftest import (
    PARKED_CHANNELS,
    UPSTREAM_CHANNEL_OPENS,
    UPSTREAM_CONNECTS,
    direct,
    drain,
    queue_counts,
    wait_for,
)
from raw_amqp import RawAMQP

ACKISH = (commands.Basic.Ack, commands.Basic.Nack)


def _raw(proxy, tenant) -> RawAMQP:
    raw = RawAMQP(proxy.host, proxy.port)
    raw.handshake(tenant.user, tenant.password, tenant.vhost)
    raw.open_channel(1)
    return raw


def _unexpected(frames, kinds):
    return [(c, type(v).__name__) for c, v in frames if isinstance(v, kinds)]


@pytest.mark.timeout(40)
def test_confirm_mode_and_tags_do_not_leak_to_next_client(proxy, tenant, queues):
    q = queues.declare(tenant)
    # A: confirm mode, three confirmed publishes, leaves with all confirms delivered
    a = proxy.connect(tenant)
    ach = a.channel()
    ach.confirm_delivery()
    for i in range(3):
        ach.basic_publish("", q, f"a-{i}".encode())
    a.close()
    proxy.wait_metric(PARKED_CHANNELS, 1, **tenant.labels)

    # B gets the parked channel: no Channel.Open upstream
    b = _raw(proxy, tenant)
    try:
        assert proxy.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) == 1, "channel not reused"
        # without Confirm.Select, B must see no Basic.Ack for its publishes
        for i in range(3):
            b.publish(1, "", q, f"b-plain-{i}".encode())
        frames = b.frames_for(0.8)
        assert _unexpected(frames, ACKISH) == [], "client not in confirm mode received acks"
        # with confirm mode, B's tags start at 1 like on a fresh channel
        b.rpc(1, commands.Confirm.Select(), commands.Confirm.SelectOk)
        b.publish(1, "", q, b"b-confirmed-1")
        ack = b.expect(commands.Basic.Ack, 1)
        assert ack.delivery_tag == 1 and not ack.multiple
        b.publish(1, "", q, b"b-confirmed-2")
        ack = b.expect(commands.Basic.Ack, 1)
        assert ack.delivery_tag == 2
    finally:
        b.close()

    # C: Confirm.Select straight away on the (again parked) channel: tags restart at 1
    c = _raw(proxy, tenant)
    try:
        c.rpc(1, commands.Confirm.Select(), commands.Confirm.SelectOk)
        for expected_tag in (1, 2, 3):
            c.publish(1, "", q, f"c-{expected_tag}".encode())
            assert c.expect(commands.Basic.Ack, 1).delivery_tag == expected_tag
    finally:
        c.close()
    assert proxy.metric(UPSTREAM_CHANNEL_OPENS, **tenant.labels) == 1
    wait_for(lambda: queue_counts(tenant, q)[0] == 11, 5)


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
        b.publish(1, "", q, b"b-plain")
        frames = b.frames_for(1.0)
        assert _unexpected(frames, ACKISH) == [], "acks of the previous client leaked"
        b.rpc(1, commands.Confirm.Select(), commands.Confirm.SelectOk)
        b.publish(1, "", q, b"b-confirmed")
        ack = b.expect(commands.Basic.Ack, 1)
        assert ack.delivery_tag == 1
    finally:
        b.close()
    wait_for(lambda: queue_counts(tenant, q)[0] == 302, 5)


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
def test_unacked_get_is_requeued_and_acks_after_reuse_hit_the_right_message(
    proxy, tenant, queues
):
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
def test_exclusive_queue_dies_with_its_client(proxy, tenant):
    a = proxy.connect(tenant)
    name = a.channel().queue_declare("", exclusive=True).method.queue
    with direct(tenant) as ch:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
            ch.queue_declare(name, passive=True)
        assert ei.value.reply_code == 405  # locked by its owner while A is connected
    a.close()

    def gone() -> bool:
        with direct(tenant) as ch:
            try:
                ch.queue_declare(name, passive=True)
                return False
            except pika.exceptions.ChannelClosedByBroker as exc:
                return exc.reply_code == 404

    wait_for(gone, 5, interval=0.2, message=f"exclusive queue {name} outlived its client")
    # and the pool still works
    b = proxy.connect(tenant)
    b.channel().queue_declare("", exclusive=True)
    b.close()
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1
