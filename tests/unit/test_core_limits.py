"""The limits, byte by byte and turn by turn: the client refused at --max-clients gets its
Connection.Close in reply to StartOk; a Channel.Open that got no upstream channel in time gets a
Channel.Close on that channel only; channels freed at --max-upstream-connections go to the
waiters first come, first served, not to a newcomer; the WARNING about refused clients comes at
most once per interval, with the count."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pamqp import commands
from support.core import PROTOCOL_HEADER, Rig, message, method, methods_of

from amqproxy.api import pool_counts
from amqproxy.channel import LeaseState
from amqproxy.errors import NoChannelFree
from amqproxy.io import admission
from amqproxy.io.admission import ClientLimit

CLOSE = commands.Channel.Close(200, "bye", 0, 0)
TEXT = "RESOURCE_ERROR - no upstream channel free within 10s (max-upstream-connections 1)"


def in_loop(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """The pool reads the event loop's clock: run the test inside one."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def names(data: bytes) -> list[str]:
    return [type(m).__name__ for _, m in methods_of(data)]


def open_channel(client: Any, rig: Rig, channel: int = 1) -> None:
    """Channel.Open from the client, on a new upstream channel the broker opens."""
    client.send(method(channel, commands.Channel.Open()))
    assert names(client.take()) == ["OpenOk"]
    for up_id, value in methods_of(rig.broker.take()):
        if isinstance(value, commands.Channel.Open):
            rig.broker.send(method(up_id, commands.Channel.OpenOk()))


@in_loop
async def test_a_client_over_max_clients_is_closed_in_reply_to_start_ok() -> None:
    rig = Rig()
    peer = rig.client()  # the rig's client helper; a second one is built by hand below
    refused = type(peer)(rig, "refused")
    refused.session.refusal = "CONNECTION_FORCED - amqproxy: too many client connections (x)"
    refused.send(PROTOCOL_HEADER)
    refused.send(method(0, commands.Connection.StartOk(mechanism="PLAIN", response="\0u\0p")))
    start, close = (m for _, m in methods_of(refused.take()))
    assert isinstance(start, commands.Connection.Start)
    assert isinstance(close, commands.Connection.Close)  # no Tune
    assert (close.reply_code, close.class_id, close.method_id) == (320, 10, 11)
    assert close.reply_text == refused.session.refusal
    refused.send(method(0, commands.Connection.CloseOk()))
    assert refused.closed and not refused.aborted
    assert rig.pool.clients == {peer.session}  # never admitted


@in_loop
async def test_no_channel_in_time_closes_that_channel_only() -> None:
    rig = Rig(max_upstream_channels=1, max_upstream_connections=1)
    holder, client = rig.client("holder"), rig.client("client")
    open_channel(holder, rig)  # the only upstream channel
    client.send(method(1, commands.Channel.Open()) + message(1, b"behind the open"))
    assert client.take() == b"" and rig.broker.take() == b""  # it waits
    ((pool, lease, _),) = client.opening
    assert rig.registry.outbox.bytes > 0  # its frames wait in the backlog

    client.session.channel_refused(lease, 506, TEXT)
    ((channel, close),) = methods_of(client.take())
    assert channel == 1 and isinstance(close, commands.Channel.Close)
    assert (close.reply_code, close.reply_text, close.class_id, close.method_id) == (
        506,
        TEXT,
        20,
        10,
    )
    assert rig.registry.outbox.bytes == 0 and not pool.delivery.pending  # dropped, as a broker
    assert lease.state is LeaseState.BROKER_CLOSED
    client.send(message(1, b"discarded until CloseOk") + method(1, commands.Channel.CloseOk()))
    assert rig.broker.take() == b"" and 1 not in client.session.leases
    assert client.session.is_open and not client.closed  # the connection carries on

    holder.send(method(1, CLOSE))  # the holder frees its channel: the client gets it now
    assert names(holder.take()) == ["CloseOk"]
    client.send(method(1, commands.Channel.Open()))
    assert names(client.take()) == ["OpenOk"]


@in_loop
async def test_a_freed_channel_goes_to_the_first_waiter_not_to_a_newcomer() -> None:
    rig = Rig(max_upstream_channels=1, max_upstream_connections=1, pool_wait_timeout=10)
    holder, newcomer = rig.client("holder"), rig.client("newcomer")
    open_channel(holder, rig)
    up = rig.channel(1)
    first = asyncio.ensure_future(rig.pool.new_channel(7))
    second = asyncio.ensure_future(rig.pool.new_channel(8))
    await asyncio.sleep(0)
    assert len(rig.pool.room) == 2 and pool_counts(rig.pool)["waiting"] == 2

    holder.send(method(1, CLOSE))  # clean and settled: parked, the first waiter woken
    assert rig.pool.parked == [up]
    newcomer.send(method(1, commands.Channel.Open()))  # in the same turn: it must not take it
    assert newcomer.take() == b"" and len(newcomer.opening) == 1
    assert await first is up and not second.done()
    assert rig.pool.stats.channel_waits == 2 and len(rig.pool.room) == 1

    rig.settings.pool_wait_timeout = 0.01  # what a reload does; the waiter gives up now
    rig.pool.room.wake_all()
    with pytest.raises(NoChannelFree) as err:
        await second
    assert err.value.code == 506 and "max-upstream-connections 1" in err.value.text
    assert rig.pool.stats.channel_wait_timeouts == 1 and not rig.pool.room


@in_loop
async def test_refused_clients_are_reported_once_per_interval_with_their_count(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(admission, "REPORT_EVERY", 0.05)
    caplog.set_level(logging.WARNING, "amqproxy.server")
    rig = Rig(max_clients=2)
    limit = ClientLimit(rig.settings)
    assert limit.refusal(1) == ""
    for _ in range(3):
        assert "max-clients 2" in limit.refusal(2)
    assert [r.getMessage() for r in caplog.records] == [
        "max-clients 2 reached: 1 client connection(s) refused"
    ]
    await asyncio.sleep(0.08)  # the interval ends: the two since then, in one line
    assert (
        caplog.records[-1]
        .getMessage()
        .startswith("max-clients 2 reached: 2 client connection(s) refused in the last")
    )
    await asyncio.sleep(0.08)  # none in this interval: no line, and the next one is at once
    assert len(caplog.records) == 2
    limit.refusal(5)
    assert len(caplog.records) == 3 and limit.refused == 4
    rig.settings.max_clients = 0  # a reload lifted the limit
    assert limit.refusal(10_000) == ""
