"""Heartbeats owned by the proxy, one leg at a time (docs/ARCHITECTURE.md).

Every H/2: send a heartbeat if nothing was written since the last tick; after 2·H with nothing
read, the peer is dead. The hot path only counts the bytes it reads and writes, which the
socket's adapter does anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from amqproxy.amqp import frames

TICKS_TO_DEATH = 4  # 4 ticks of H/2 = 2·H


class Heartbeat:
    """The heartbeat timer of one socket; ``send`` writes a frame, ``dead`` ends the peer,
    ``traffic`` tells the bytes read and written so far (the socket counts them anyway)."""

    __slots__ = ("_interval", "_seen", "_silent", "_timer", "dead", "loop", "send", "traffic")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send: Callable[[bytes], None],
        dead: Callable[[], None],
        traffic: Callable[[], tuple[int, int]],
    ) -> None:
        self.loop = loop
        self.send = send
        self.dead = dead
        self.traffic = traffic
        self._seen = (0, 0)  # (read, written) at the last tick, our own heartbeat included
        self._silent = 0
        self._interval = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def start(self, seconds: int) -> None:
        if seconds > 0:
            self._interval = seconds / 2
            self._timer = self.loop.call_later(self._interval, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        read, written = self.traffic()
        last_read, last_written = self._seen
        if written == last_written:
            self.send(frames.HEARTBEAT)
            written = self.traffic()[1]  # our heartbeat is not traffic the next tick can count
        self._seen = (read, written)
        if read != last_read:
            self._silent = 0
        else:
            self._silent += 1
            if self._silent >= TICKS_TO_DEATH:
                self._timer = None
                self.dead()
                return
        self._timer = self.loop.call_later(self._interval, self._tick)
