"""The client and upstream sessions, byte by byte, without sockets or a broker.

Each test plays the client and the broker (``support.core.Rig``) and asserts the frames each
side receives: what the end-to-end suites can only reach through whatever TCP splits and
timings happen is made to happen here on purpose.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from pamqp import commands
from support.core import Rig, content, frames_of, message, method, methods_of

from amqproxy.channel import ChannelState

Test = Callable[[], Awaitable[None]]


def in_loop(test: Test) -> Callable[[], None]:
    """The pool reads the event loop's clock: run the test inside one."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


def ends_between_messages(sent: list[tuple[int, int, bytes]]) -> bool:
    """The frames hold whole messages: every publish has its header and all its body."""
    due = -1  # -1: no message open; else the body bytes still due (0: the header is due)
    for ftype, _channel, payload in sent:
        if ftype == 1 and payload[:4] == PUBLISH_ID:
            due = 0
        elif ftype == 2:
            due = int.from_bytes(payload[4:12], "big") or -1
        elif ftype == 3:
            due = due - len(payload) or -1
    return due == -1


PUBLISH_ID = b"\x00\x3c\x00\x28"


def names(data: bytes) -> list[str]:
    return [type(m).__name__ for _, m in methods_of(data)]


def open_channel(client: Any, rig: Rig, channel: int = 1) -> bytes:
    """Channel.Open from the client: returns what the proxy sent upstream for it (and the
    broker answers a new upstream channel)."""
    client.send(method(channel, commands.Channel.Open()))
    assert names(client.take()) == ["OpenOk"]
    sent = rig.broker.take()
    for up_id, value in methods_of(sent):
        if isinstance(value, commands.Channel.Open):
            rig.broker.send(method(up_id, commands.Channel.OpenOk()))
    return sent


OPEN_AND_SELECT = ["Open", "Select"]
CLOSE = commands.Channel.Close(200, "bye", 0, 0)


# ---- publishes and the read boundaries ------------------------------------------------------


SMALL = 4096  # the client's frame_max: messages of several body frames stay short


def publish_stream() -> bytes:
    """Messages of every shape on channel 1: empty, small, several body frames, mandatory."""
    return (
        message(1, b"", frame_max=SMALL)
        + message(1, b"x" * 10, frame_max=SMALL)
        + message(1, b"y" * 10_000, frame_max=SMALL)
        + message(1, b"m", mandatory=True, frame_max=SMALL)
        + method(1, commands.Basic.Ack(delivery_tag=0))  # an ack between messages
        + message(1, b"z" * (SMALL - 8), frame_max=SMALL)  # exactly one full body frame
    )


@in_loop
async def test_a_publish_goes_upstream_whole_wherever_the_reads_split_it() -> None:
    stream = publish_stream()
    whole = frames_of(stream)
    rig = Rig()
    client = rig.client(frame_max=SMALL)
    open_channel(client, rig)
    up = rig.channel(1)
    for cut in range(len(stream) + 1):
        client.send(stream[:cut])
        first = rig.broker.take()
        sent = frames_of(first)  # whole frames only, never a partial one
        assert sent == whole[: len(sent)], cut
        assert ends_between_messages(sent), cut  # ... and whole messages only
        client.send(stream[cut:])
        assert first + rig.broker.take() == stream, cut
        assert up.published == 5 * (cut + 1), cut  # confirm tags counted; the ack is not one
        rig.broker.send(method(1, commands.Basic.Ack(delivery_tag=up.published, multiple=True)))
    assert client.take() == b"" and up.outbox.count == 0


@in_loop
async def test_a_message_cut_off_by_the_client_never_goes_upstream() -> None:
    rig = Rig()
    client = rig.client()
    open_channel(client, rig)
    partial = message(1, b"a" * 300_000)[:-50_000]
    client.send(message(1, b"done") + partial)
    assert rig.broker.take() == message(1, b"done")
    client.session.lost(None)  # the client dies mid-message
    assert rig.broker.take() == b""  # nothing of it; the channel is settling, not closed
    assert rig.channel(1).outbox.count == 1


@in_loop
async def test_content_out_of_order_closes_the_client_with_the_broker_code() -> None:
    rig = Rig()
    client = rig.client()
    open_channel(client, rig)
    header_first = message(1, b"abc")
    header_first = header_first[header_first.index(b"\x02\x00\x01") :]  # no Basic.Publish
    client.send(header_first)
    (close,) = [m for _, m in methods_of(client.take())]
    assert isinstance(close, commands.Connection.Close) and close.reply_code == 505
    assert rig.broker.take() == b""


@in_loop
async def test_broker_frames_reach_a_client_only_while_its_connection_is_open() -> None:
    """Frames from the broker go to the client's socket while its connection is open; once the
    proxy has sent Connection.Close, nothing but the close handshake goes."""
    rig = Rig()
    client = rig.client()
    client.session.send([b"frames", b" of a read"])
    assert client.take() == b"frames of a read"
    client.send(b"\x02\x00\x00\x00\x00\x00\x00\xce")  # a content header on channel 0: 505
    (close,) = [m for _, m in methods_of(client.take())]
    assert isinstance(close, commands.Connection.Close) and close.reply_code == 505
    client.session.send([b"late"])
    assert client.take() == b""


# ---- renumbered channels and translated tags ------------------------------------------------


@in_loop
async def test_a_client_channel_on_another_upstream_id_is_renumbered_both_ways() -> None:
    rig = Rig()
    first, second = rig.client("a"), rig.client("b")
    open_channel(first, rig)  # upstream channel 1
    up_frames = open_channel(second, rig)  # its channel 1 rides upstream channel 2
    assert {ch for _, ch, _ in frames_of(up_frames)} == {2}
    traffic = message(1, b"hello") + method(1, commands.Basic.Qos(prefetch_count=5))
    second.send(traffic)
    sent = frames_of(rig.broker.take())
    assert {ch for _, ch, _ in sent} == {2}
    assert [(t, p) for t, _, p in sent] == [(t, p) for t, _, p in frames_of(traffic)]
    rig.broker.send(method(2, commands.Basic.QosOk()))
    assert second.take() == method(1, commands.Basic.QosOk())
    assert first.take() == b""


@in_loop
async def test_confirm_tags_start_at_one_for_each_client_of_a_channel() -> None:
    rig = Rig()
    first = rig.client("a")
    open_channel(first, rig)
    first.send(message(1, b"1") + message(1, b"2") + message(1, b"3"))  # without confirms
    rig.broker.take()
    rig.broker.send(method(1, commands.Basic.Ack(delivery_tag=3, multiple=True)))
    first.send(method(1, CLOSE))
    assert names(first.take()) == ["CloseOk"]
    assert rig.pool.parked == [rig.channel(1)]  # settled: every confirm is in

    second = rig.client("b")
    assert open_channel(second, rig) == b""  # the parked channel: nothing upstream
    second.send(method(1, commands.Confirm.Select()))
    assert names(second.take()) == ["SelectOk"]  # answered here: the channel is in it already
    second.send(message(1, b"4") + message(1, b"5"))
    rig.broker.take()
    rig.broker.send(method(1, commands.Basic.Ack(delivery_tag=4)))
    rig.broker.send(method(1, commands.Basic.Ack(delivery_tag=5, multiple=True)))
    assert second.take() == method(1, commands.Basic.Ack(delivery_tag=1)) + method(
        1, commands.Basic.Ack(delivery_tag=2, multiple=True)
    )


@in_loop
async def test_delivery_tags_are_translated_for_the_next_client_of_a_channel() -> None:
    rig = Rig()
    first = rig.client("a")
    open_channel(first, rig)
    first.send(method(1, commands.Basic.Get(queue="q", no_ack=True)))
    rig.broker.take()
    get_ok = method(
        1, commands.Basic.GetOk(delivery_tag=1, exchange="", routing_key="q", message_count=0)
    )
    body = content(1, b"one")
    rig.broker.send(get_ok + body)
    assert first.take() == get_ok + body
    first.send(method(1, CLOSE))
    assert rig.pool.parked == [rig.channel(1)]

    second = rig.client("b")
    open_channel(second, rig)
    second.send(method(1, commands.Basic.Get(queue="q")))
    rig.broker.take()
    rig.broker.send(
        method(
            1, commands.Basic.GetOk(delivery_tag=2, exchange="", routing_key="q", message_count=0)
        )
        + body
    )
    got = methods_of(second.take())
    assert got[0][1].delivery_tag == 1  # the client's own numbering
    second.send(method(1, commands.Basic.Ack(delivery_tag=1)))
    assert rig.broker.take() == method(1, commands.Basic.Ack(delivery_tag=2))


# ---- parking, settling, and errors that arrive late ----------------------------------------


@in_loop
async def test_a_channel_with_confirms_due_settles_before_it_is_parked() -> None:
    rig = Rig()
    client = rig.client()
    open_channel(client, rig)
    client.send(message(1, b"a") + method(1, CLOSE))
    assert names(client.take()) == ["CloseOk"]  # answered at once: the outbox has the message
    rig.broker.take()
    up = rig.channel(1)
    assert up in rig.pool.settling and not rig.pool.parked
    other = rig.client("b")
    assert names(open_channel(other, rig)) == OPEN_AND_SELECT  # not the unsettled one
    rig.broker.send(method(1, commands.Basic.Ack(1)))
    assert rig.pool.parked == [up] and up not in rig.pool.settling
    assert up.outbox.count == 0


@in_loop
async def test_a_broker_error_after_the_client_left_reaches_no_other_client() -> None:
    rig = Rig()
    gone = rig.client("gone")
    open_channel(gone, rig)
    gone.send(message(1, b"lost", exchange="missing") + method(1, CLOSE))
    assert names(gone.take()) == ["CloseOk"]
    gone.session.lost(None)
    rig.broker.take()
    newcomer = rig.client("new")
    open_channel(newcomer, rig)  # upstream channel 2: channel 1 waits for its confirm
    close = commands.Channel.Close(404, "NOT_FOUND - no exchange 'missing' in vhost '/'", 60, 40)
    rig.broker.send(method(1, close))
    assert newcomer.take() == b""  # nothing of the old client's error
    assert rig.broker.take() == method(1, commands.Channel.CloseOk())
    assert 1 not in rig.upstream.channels and rig.pool.stats.refused == 1
    assert rig.pool.stats.orphan_channel_errors == 1


@in_loop
async def test_a_broker_close_crossing_the_clients_close_completes_both() -> None:
    rig = Rig()
    client = rig.client()
    open_channel(client, rig)
    client.send(method(1, commands.Basic.Consume(queue="q")))  # the channel is not reusable
    rig.broker.take()
    client.send(method(1, CLOSE))
    assert names(rig.broker.take()) == ["Close"]
    assert rig.channel(1).state is ChannelState.CLOSING
    broker_close = commands.Channel.Close(406, "PRECONDITION_FAILED - crossing", 60, 20)
    rig.broker.send(method(1, broker_close))
    assert client.take() == method(1, broker_close)
    assert rig.broker.take() == method(1, commands.Channel.CloseOk())
    assert 1 in rig.upstream.channels  # the id stays taken until our Close has its CloseOk
    rig.broker.send(method(1, commands.Channel.CloseOk()))
    assert client.take() == method(1, commands.Channel.CloseOk())
    client.send(method(1, commands.Channel.CloseOk()))
    assert 1 not in rig.upstream.channels and client.session.leases == {}


# ---- exclusive queues and flow control -------------------------------------------------------


@in_loop
async def test_another_clients_exclusive_queue_is_refused_with_405_here() -> None:
    rig = Rig()
    owner, other = rig.client("owner"), rig.client("other")
    open_channel(owner, rig)
    open_channel(other, rig)
    owner.send(method(1, commands.Queue.Declare(queue="mine", exclusive=True)))
    rig.broker.take()
    rig.broker.send(method(1, commands.Queue.DeclareOk("mine", 0, 0)))
    owner.take()
    other.send(method(1, commands.Basic.Consume(queue="mine")))
    (close,) = [m for _, m in methods_of(other.take())]
    assert close.reply_code == 405 and "'mine'" in close.reply_text
    assert rig.broker.take() == b""  # nothing reached the broker
    owner.session.lost(None)  # its exclusive queue goes with it
    deleted = rig.broker.take()
    assert (
        method(3, commands.Queue.Delete(queue="mine", nowait=True)) in deleted
    )  # on its own channel


@in_loop
async def test_a_full_upstream_stops_reading_its_clients_until_it_drains() -> None:
    rig = Rig()
    client = rig.client()
    open_channel(client, rig)
    rig.upstream.set_paused(True)
    client.send(message(1, b"a"))
    assert "upstream" in client.held
    rig.upstream.set_paused(False)
    assert not client.held


@in_loop
async def test_tx_select_after_a_consume_is_refused_rather_than_losing_the_consumer() -> None:
    """The proxy's upstream channels are in confirm mode, and the broker refuses tx there: a
    clean channel moves to one without confirm mode, but a consumer cannot move with it. Its
    client gets a channel error (406) instead of a channel whose consumer silently vanished;
    the upstream channel, consumer and all, is closed, never parked."""
    rig = Rig()
    client = rig.client()
    open_channel(client, rig)
    client.send(method(1, commands.Basic.Consume(queue="q")))
    assert names(rig.broker.take()) == ["Consume"]
    rig.broker.send(method(1, commands.Basic.ConsumeOk("ctag")))
    assert names(client.take()) == ["ConsumeOk"]
    client.send(method(1, commands.Tx.Select()))
    (close,) = [m for _, m in methods_of(client.take())]
    assert isinstance(close, commands.Channel.Close) and close.reply_code == 406
    assert "select tx before consuming" in close.reply_text
    assert names(rig.broker.take()) == ["Close"]  # the consumer's channel, closed upstream
    assert not client.opening  # no new channel without the consumer

    fresh = rig.client("fresh")  # a clean channel still moves, tx first
    open_channel(fresh, rig)
    fresh.send(method(1, commands.Tx.Select()))
    assert client.take() == b"" and len(fresh.opening) == 1
