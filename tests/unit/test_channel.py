"""Confirm bookkeeping that decides when a released channel may be parked."""

from amqproxy.channel import ChannelState, UpstreamChannel
from amqproxy.outbox import Totals


def channel() -> UpstreamChannel:
    up = UpstreamChannel(conn=None, channel_id=1, totals=Totals(1 << 20))  # type: ignore[arg-type]
    up.state = ChannelState.OPEN
    up.confirm_mode = True
    return up


def test_in_order_single_acks_settle() -> None:
    up = channel()
    up.published = 3
    assert not up.settled
    for tag in (1, 2, 3):
        up.confirm(tag, False)
    assert up.unconfirmed == 0 and up.settled


def test_out_of_order_acks_are_counted_once() -> None:
    up = channel()
    up.published = 4
    up.confirm(3, False)
    up.confirm(2, False)
    assert up.unconfirmed == 2
    up.confirm(1, False)
    assert up.confirmed == 3 and up.unconfirmed == 1
    up.confirm(4, False)
    assert up.settled


def test_multiple_ack_covers_everything_below() -> None:
    up = channel()
    up.published = 10
    up.confirm(7, False)
    up.confirm(5, True)
    assert up.unconfirmed == 4  # 6, 8, 9, 10
    up.confirm(10, True)
    assert up.unconfirmed == 0 and not up.confirmed_ahead


def test_pending_replies_block_settling() -> None:
    up = channel()
    up.request_sent()
    assert not up.settled
    up.reply_received()
    assert up.settled


def test_a_channel_is_not_settled_before_its_open_ok() -> None:
    up = channel()
    up.state = ChannelState.OPENING
    assert not up.settled
