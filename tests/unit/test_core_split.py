"""Consumers apart from publishers, byte by byte: when a client channel on a publish
connection starts to consume, it moves to a consume connection of its pool with the method
that made it move first; when it cannot move unnoticed, it stays (``core.split``, ``roles``).

The rig has a publish connection (``rig.broker`` plays its broker) and, in these tests, a
consume connection (``cbroker``). The host's round trip for the new channel is played by the
test: ``roles.channel_now``, what the host's ``Roles.channel`` does when a consume connection
has room, then ``channel_ready``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from pamqp import commands
from support.core import BrokerPeer, ClientPeer, Rig, content, message, method, methods_of

from amqproxy.core.upstream import UpstreamSession
from amqproxy.janitor import sweep_pool
from amqproxy.roles import CONSUME, PUBLISH

CLOSE = commands.Channel.Close(200, "bye", 0, 0)
QOS = commands.Basic.Qos(prefetch_count=10)


def in_loop(test: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """The pool reads the event loop's clock: run the test inside one."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


def names(data: bytes) -> list[str]:
    return [type(m).__name__ for _, m in methods_of(data)]


def split_rig(**settings: Any) -> tuple[Rig, UpstreamSession, BrokerPeer]:
    rig = Rig(split_consumers=True, **settings)
    consume, cbroker = rig.consume_upstream()
    return rig, consume, cbroker


def open_channel(client: ClientPeer, rig: Rig, channel: int = 1) -> None:
    """Channel.Open from the client: a new upstream channel on the publish connection."""
    client.send(method(channel, commands.Channel.Open()))
    assert names(client.take()) == ["OpenOk"]
    for up_id, value in methods_of(rig.broker.take()):
        if isinstance(value, commands.Channel.Open):
            rig.broker.send(method(up_id, commands.Channel.OpenOk()))


def finish_move(rig: Rig, client: ClientPeer, cbroker: BrokerPeer) -> int:
    """The host's part of a move: a channel on the consume connection, bound to the lease;
    the consume broker opens it. Returns its upstream id."""
    lease, near = client.moves[-1]
    up = rig.pool.roles.channel_now(lease.channel_id, near)
    assert up is not None and up.conn.role == CONSUME
    client.session.channel_ready(lease, up)
    cbroker.send(method(up.id, commands.Channel.OpenOk()))
    return up.id


@in_loop
async def test_qos_then_consume_move_to_the_consume_connection_qos_first() -> None:
    rig, consume, cbroker = split_rig()
    client = rig.client()
    open_channel(client, rig)
    publish_up = rig.channel(1)
    client.send(method(1, QOS) + method(1, commands.Basic.Consume(queue="jobs")))
    assert rig.broker.take() == b""  # nothing of the consumer on the publish connection
    assert client.take() == b"" and len(client.moves) == 1
    assert rig.pool.parked == [publish_up]  # clean and settled: the next publisher's

    up_id = finish_move(rig, client, cbroker)
    sent = methods_of(cbroker.take())
    assert [type(m).__name__ for _, m in sent] == ["Open", "Select", "Qos", "Consume"]
    assert {ch for ch, _ in sent} == {up_id}
    assert sent[2][1].prefetch_count == 10
    lease = client.session.leases[1]
    assert lease.up is not None and lease.up.conn is consume and lease.up.dirty == "qos"

    cbroker.send(method(up_id, commands.Basic.QosOk()))
    cbroker.send(method(up_id, commands.Basic.ConsumeOk(consumer_tag="ctag")))
    assert client.take() == method(1, commands.Basic.QosOk()) + method(
        1, commands.Basic.ConsumeOk(consumer_tag="ctag")
    )
    deliver = commands.Basic.Deliver("ctag", 1, False, "", "jobs")
    cbroker.send(method(up_id, deliver) + content(up_id, b"job"))
    assert client.take() == method(1, deliver) + content(1, b"job")
    client.send(method(1, commands.Basic.Ack(delivery_tag=1)))
    assert cbroker.take() == method(up_id, commands.Basic.Ack(delivery_tag=1))
    assert rig.pool.stats.consumer_moves == 1


@in_loop
async def test_a_channel_that_cannot_move_unnoticed_stays() -> None:
    rig, _, cbroker = split_rig()
    confirms = rig.client("confirms")  # published since it selected confirms: its tags
    open_channel(confirms, rig)
    confirms.send(method(1, commands.Confirm.Select()))
    assert names(confirms.take()) == ["SelectOk"]
    confirms.send(message(1, b"confirmed"))
    rig.broker.take()
    rig.broker.send(method(1, commands.Basic.Ack(delivery_tag=1)))
    assert confirms.take() == method(1, commands.Basic.Ack(delivery_tag=1))
    confirms.send(method(1, commands.Basic.Consume(queue="q")))
    assert names(rig.broker.take()) == ["Consume"] and not confirms.moves

    unconfirmed = rig.client("unconfirmed")  # a publish not confirmed yet: order would suffer
    open_channel(unconfirmed, rig, 1)
    unconfirmed.send(message(1, b"first") + method(1, commands.Basic.Consume(queue="q")))
    sent = names(rig.broker.take())
    assert sent == ["Publish", "Consume"] and not unconfirmed.moves

    waiting = rig.client("waiting")  # a reply due on the channel
    open_channel(waiting, rig)
    waiting.send(method(1, commands.Queue.Declare(queue="q")) + method(1, QOS))
    assert names(rig.broker.take()) == ["Declare", "Qos"] and not waiting.moves

    last_queue = rig.client("last-queue")  # queue "" is the channel's last declared queue
    open_channel(last_queue, rig)
    last_queue.send(method(1, commands.Basic.Consume(queue="")))
    assert names(rig.broker.take()) == ["Consume"] and not last_queue.moves
    assert cbroker.take() == b"" and rig.pool.stats.consumer_moves == 0


@in_loop
async def test_without_room_for_a_consume_connection_the_consumer_stays() -> None:
    rig = Rig(split_consumers=True, max_upstream_connections=1)
    client = rig.client()
    open_channel(client, rig)
    client.send(method(1, QOS))
    assert names(rig.broker.take()) == ["Qos"] and not client.moves

    off = Rig()  # the split switched off: as before
    other = off.client()
    open_channel(other, off)
    other.send(method(1, commands.Basic.Consume(queue="q")))
    assert names(off.broker.take()) == ["Consume"] and not other.moves


@in_loop
async def test_a_clients_consumers_and_its_exclusive_queues_share_one_consume_connection() -> None:
    rig, consume, cbroker = split_rig()
    second, _ = rig.consume_upstream()  # another consume connection with room
    client = rig.client()
    open_channel(client, rig, 1)
    open_channel(client, rig, 2)
    client.send(method(1, commands.Queue.Declare(queue="mine", exclusive=True)))
    assert rig.broker.take() == b""
    up_id = finish_move(rig, client, cbroker)
    assert names(cbroker.take()) == ["Open", "Select", "Declare"]
    cbroker.send(method(up_id, commands.Queue.DeclareOk("mine", 0, 0)))
    assert names(client.take()) == ["DeclareOk"]
    assert consume.exclusive_owners == {b"mine": client.session}

    # channel 2 binds the exclusive queue: it must be where the queue is
    client.send(method(2, commands.Queue.Bind(queue="mine", exchange="amq.topic")))
    assert rig.broker.take() == b""
    lease, near = client.moves[-1]
    assert lease.channel_id == 2 and near is consume
    up2 = finish_move(rig, client, cbroker)
    assert names(cbroker.take()) == ["Open", "Select", "Bind"]
    assert client.session.leases[2].up is consume.channels[up2]
    assert second.channels == {}


@in_loop
async def test_another_clients_exclusive_queue_is_refused_on_the_consume_connection_too() -> None:
    rig, consume, cbroker = split_rig()
    owner, other = rig.client("owner"), rig.client("other")
    open_channel(owner, rig)
    owner.send(method(1, commands.Queue.Declare(queue="mine", exclusive=True, nowait=True)))
    finish_move(rig, owner, cbroker)
    assert names(cbroker.take()) == ["Open", "Select", "Declare"]
    assert consume.exclusive_owners == {b"mine": owner.session}

    open_channel(other, rig)
    other.send(method(1, commands.Basic.Consume(queue="mine")))
    finish_move(rig, other, cbroker)  # moved beside the queue: there it is locked
    ((_, close),) = methods_of(other.take())
    assert close.reply_code == 405 and "'mine'" in close.reply_text
    # the Consume never went upstream; the channel it had is closed (consume channels do not park)
    assert names(cbroker.take()) == ["Open", "Select", "Close"]


@in_loop
async def test_channels_of_consume_connections_are_not_parked_and_publishers_avoid_them() -> None:
    rig, consume, cbroker = split_rig(max_upstream_channels=2)
    client = rig.client()
    open_channel(client, rig, 1)
    open_channel(client, rig, 2)
    assert rig.upstream.free_channels == 0
    assert rig.pool.roles.publish_connection() is None  # a new publish connection, not C

    rig.settings.max_upstream_connections = 2  # now at the limit: C rather than a wait
    assert rig.pool.roles.publish_connection() is consume
    client.send(method(3, commands.Channel.Open()))
    assert names(client.take()) == ["OpenOk"]
    up = client.session.leases[3].up
    assert up is not None and up.conn is consume
    cbroker.send(method(up.id, commands.Channel.OpenOk()))
    client.send(message(3, b"m") + method(3, CLOSE))
    cbroker.send(method(up.id, commands.Basic.Ack(delivery_tag=1)))
    assert names(client.take()) == ["CloseOk"]
    assert up not in rig.pool.parked and up.dirty == "on a consume connection"
    assert names(cbroker.take())[-1] == "Close"
    assert rig.upstream.role == PUBLISH


@in_loop
async def test_while_the_publish_connection_is_blocked_declarations_go_where_consumers_go() -> None:
    rig, consume, cbroker = split_rig()
    assert consume.role == CONSUME
    rig.broker.send(method(0, commands.Connection.Blocked("low on memory")))
    assert rig.upstream.blocked_reason == "low on memory"

    consumer = rig.client("consumer")  # declares its queue, then consumes
    open_channel(consumer, rig)
    consumer.send(method(1, commands.Queue.Declare(queue="jobs", durable=True)))
    assert rig.broker.take() == b""  # the blocked connection would not read it
    ((lease, _),) = consumer.moves
    up_id = finish_move(rig, consumer, cbroker)
    assert names(cbroker.take()) == ["Open", "Select", "Declare"]
    cbroker.send(method(up_id, commands.Queue.DeclareOk("jobs", 5, 0)))
    assert names(consumer.take()) == ["DeclareOk"]
    consumer.send(method(1, QOS) + method(1, commands.Basic.Consume(queue="jobs")))
    assert names(cbroker.take()) == ["Qos", "Consume"] and len(consumer.moves) == 1
    assert lease not in consumer.session.channels.split.tentative  # a consumer: it stays

    publisher = rig.client("publisher")  # declares its exchange, then publishes
    open_channel(publisher, rig)
    publisher.send(method(1, commands.Exchange.Declare(exchange="ex", exchange_type="topic")))
    up_id = finish_move(rig, publisher, cbroker)
    assert names(cbroker.take()) == ["Open", "Select", "Declare"]
    cbroker.send(method(up_id, commands.Exchange.DeclareOk()))
    assert names(publisher.take()) == ["DeclareOk"]
    body = message(1, b"m" * 100, exchange="ex")
    publisher.send(body[:30])  # the publish goes back to the publish connection, whole
    publisher.send(body[30:])
    assert names(cbroker.take()) == ["Close"]  # its consume channel is given back
    pool, lease, confirm = publisher.opening[-1]
    assert confirm and len(publisher.moves) == 1  # a publish channel, in confirm mode
    up = pool.take_parked(1) or pool.open_now(1)
    assert up is not None and up.conn is rig.upstream
    publisher.session.channel_ready(lease, up)
    assert up.id == 1 and rig.broker.take() == body  # the parked channel: just the message


@in_loop
async def test_a_client_with_confirms_moves_before_it_publishes_and_keeps_its_tags() -> None:
    rig, _, cbroker = split_rig()
    earlier = rig.client("earlier")  # leaves a parked channel with three confirmed publishes
    open_channel(earlier, rig)
    earlier.send(message(1, b"1") + message(1, b"2") + message(1, b"3") + method(1, CLOSE))
    rig.broker.take()
    rig.broker.send(method(1, commands.Basic.Ack(delivery_tag=3, multiple=True)))
    assert rig.pool.parked == [rig.channel(1)]
    rig.broker.send(method(0, commands.Connection.Blocked("low on memory")))

    client = rig.client()
    client.send(method(1, commands.Channel.Open()) + method(1, commands.Confirm.Select()))
    assert names(client.take()) == ["OpenOk", "SelectOk"]  # the parked channel
    client.send(method(1, commands.Queue.Declare(queue="q", passive=True)))
    up_id = finish_move(rig, client, cbroker)  # blocked publish connection: it moves for now
    assert names(cbroker.take()) == ["Open", "Select", "Declare"]
    cbroker.send(method(up_id, commands.Queue.DeclareOk("q", 0, 0)))
    assert names(client.take()) == ["DeclareOk"]

    client.send(message(1, b"mine"))  # a publish: back to a publish channel, tag 1 still
    pool, lease, confirm = client.opening[-1]
    up = pool.take_parked(1)
    assert confirm and up is rig.channel(1) and up.published == 3
    client.session.channel_ready(lease, up)
    assert rig.broker.take() == message(1, b"mine")
    rig.broker.send(method(1, commands.Basic.Ack(delivery_tag=4)))
    assert client.take() == method(1, commands.Basic.Ack(delivery_tag=1))


@in_loop
async def test_idle_sweeps_keep_the_last_publish_connection_of_a_pool_with_clients() -> None:
    rig, consume, cbroker = split_rig()
    rig.client()  # admitted, nothing leased: both connections are idle
    sweep_pool(rig.pool, rig.loop.time() + 60, idle_timeout=5)
    assert rig.upstream.open  # where the next Channel.Open lands at once
    assert not consume.open and names(cbroker.take()) == ["Close"]


@in_loop
async def test_new_consumers_avoid_a_consume_connection_where_a_channel_publishes() -> None:
    rig, consume, cbroker = split_rig()
    roles = rig.pool.roles
    rpc = rig.client("rpc-server")  # consumes, then publishes its replies on that channel
    open_channel(rpc, rig)
    rpc.send(method(1, QOS))
    finish_move(rig, rpc, cbroker)
    rpc.send(message(1, b"reply"))
    assert roles.consume_connection(None) is consume  # the only one: it will do
    assert roles.consume_connection(None, clean=True) is None  # Roles.channel connects first
    clean, _ = rig.consume_upstream()
    assert roles.consume_connection(None) is clean
    assert roles.consume_connection(consume) is consume  # a client's own stays together
