"""The outbox without a broker: what is kept, what a confirm releases, what is replayed."""

from __future__ import annotations

from pamqp import body as pbody
from pamqp import commands
from pamqp import frame as pframe
from pamqp import header as pheader

from amqproxy.channel import ChannelState, UpstreamChannel
from amqproxy.outbox import ChannelOutbox, Message, Totals, publishes_in, refused_index, unconfirmed


def publish(exchange: str, key: str, body: bytes, channel: int = 1, frame_max: int = 4096) -> bytes:
    out = pframe.marshal(commands.Basic.Publish(exchange=exchange, routing_key=key), channel)
    out += pframe.marshal(pheader.ContentHeader(0, len(body), commands.Basic.Properties()), channel)
    step = frame_max - 8
    for pos in range(0, len(body), step):
        out += pframe.marshal(pbody.ContentBody(body[pos : pos + step]), channel)
    return out


def ack(tag: int, channel: int = 1) -> bytes:
    return pframe.marshal(commands.Basic.Ack(delivery_tag=tag), channel)


def bodies(messages: list[tuple[int, Message]]) -> list[tuple[int, bytes]]:
    return [(tag, m.body) for tag, m in messages]


def test_publishes_in_finds_whole_messages_and_says_if_that_was_all() -> None:
    data = publish("", "q", b"one") + publish("x", "k", b"") + publish("", "q", b"z" * 9000)
    found, only = publishes_in(data)
    assert [(m[6:7], body) for m, _h, body in found] == [
        (b"\x00", b"one"),
        (b"\x01", b""),
        (b"\x00", b"z" * 9000),
    ]
    assert only
    assert publishes_in(data + ack(3))[1] is False  # another method among them
    assert publishes_in(publish("", "q", b"abcdef")[:-9])[1] is False  # an unfinished message
    assert publishes_in(b"") == ([], True)


def test_an_entry_of_a_run_yields_its_messages_with_their_tags_skipping_acks() -> None:
    outbox = ChannelOutbox(Totals(1 << 20))
    run = publish("", "q", b"a") + ack(7) + publish("", "q", b"b") + publish("", "q", b"c")
    outbox.add(12, 3, (run[:50], run[50:]), "client-1", 5.0)
    [(entry)] = outbox.entries
    assert bodies(list(entry.messages())) == [(10, b"a"), (11, b"b"), (12, b"c")]
    assert {m.origin for _t, m in entry.messages()} == {"client-1"}


def test_confirms_release_whole_entries_and_the_totals_follow() -> None:
    totals = Totals(1 << 20)
    up = UpstreamChannel(None, 1, totals)  # type: ignore[arg-type]
    up.state = ChannelState.OPEN
    up.confirm_mode = True
    for tag in (1, 2, 3):
        up.published = tag
        up.outbox.add(tag, 1, (publish("", "q", b"m%d" % tag),), "c", 0.0)
    assert totals.messages == 3 and up.outbox.count == 3
    up.confirm(2, True)
    assert [e.last_tag for e in up.outbox.entries] == [3]
    assert totals.messages == 1 and totals.bytes == up.outbox.size
    up.confirm(3, False)
    assert not up.outbox and totals.messages == 0 and totals.bytes == 0 and up.settled


def test_unconfirmed_skips_what_the_broker_acked_out_of_order() -> None:
    outbox = ChannelOutbox(Totals(1 << 20))
    outbox.add(4, 4, (b"".join(publish("", "q", b"%d" % i) for i in range(1, 5)),), "c", 0.0)
    left = unconfirmed(outbox.take(), confirmed=1, ahead={3})
    assert bodies(left) == [(2, b"2"), (4, b"4")]
    assert outbox.totals.bytes == 0 and not outbox


def test_message_frames_are_split_for_the_new_connection() -> None:
    [(method, header, body)] = publishes_in(publish("ex", "rk", b"y" * 10000, frame_max=131072))[0]
    message = Message(method, header, body, "c", 0.0, 1)
    frames = message.frames(channel=9, frame_max=4096)
    assert len(frames) == 2 + 3  # method, header, three bodies of at most 4088 bytes
    assert publishes_in(b"".join(frames))[0] == [(method, header, body)]
    assert all(f[1:3] == b"\x00\x09" for f in frames)
    assert message.exchange == "ex"
    assert message.size == len(method) + len(header) + len(body) + 24


def test_refused_index_follows_the_exchange_the_error_names() -> None:
    def msg(exchange: str) -> Message:
        method = publishes_in(publish(exchange, "k", b"."))[0][0][0]
        return Message(method, b"", b".", "c", 0.0, 1)

    messages = [(1, msg("")), (2, msg("gone")), (3, msg(""))]
    assert refused_index(messages, "NOT_FOUND - no exchange 'gone' in vhost '/'") == 1
    text = "ACCESS_REFUSED - access to exchange 'gone' in vhost 'v' refused for user 'u'"
    assert refused_index(messages, text) == 1
    assert refused_index(messages, "PRECONDITION_FAILED - invalid expiration") == 0


class Waiter:
    def __init__(self) -> None:
        self.woken = 0

    def outbox_ready(self) -> None:
        self.woken += 1


def test_totals_are_full_above_the_limit_and_wake_waiters_below_nine_tenths() -> None:
    totals = Totals(1000)
    waiter = Waiter()
    totals.add(900, 1)
    assert not totals.full
    totals.add(200, 1)
    assert totals.full
    totals.waiters.add(waiter)
    totals.remove(150, 0)  # 950: above 900, still full
    assert totals.full and waiter.woken == 0
    totals.remove(100, 1)
    assert not totals.full and waiter.woken == 1 and not totals.waiters
    assert totals.full_seconds >= 0.0
