"""Heartbeats owned by the proxy, one leg at a time (docs/ARCHITECTURE.md).

Every H/2: send a heartbeat if nothing was written since the last tick; after 2·H with nothing
read, the peer is dead. The hot path only sets the two booleans, or (``traffic``) counts the
bytes it reads and writes anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from amqproxy.amqp import frames

TICKS_TO_DEATH = 4  # 4 ticks of H/2 = 2·H


class Heartbeat:
    """The heartbeat timer of one socket; ``send`` writes a frame, ``dead`` ends the peer."""

    __slots__ = (
        "_interval", "_seen", "_silent", "_timer", "dead", "loop", "read_seen", "send", "traffic",
        "wrote",
    )  # fmt: skip

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send: Callable[[bytes], None],
        dead: Callable[[], None],
        traffic: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.loop = loop
        self.send = send
        self.dead = dead
        self.traffic = traffic  # (bytes read, bytes written) so far, instead of the booleans
        self._seen = (0, 0)  # ... at the last tick
        self.read_seen = False  # something arrived since the last tick
        self.wrote = False  # something was written since the last tick
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
        if self.traffic is not None:
            seen, self._seen = self._seen, self.traffic()
            self.read_seen = self._seen[0] != seen[0]
            self.wrote = self._seen[1] != seen[1]
        if not self.wrote:
            self.send(frames.HEARTBEAT)
        self.wrote = False
        if self.read_seen:
            self._silent = 0
        else:
            self._silent += 1
            if self._silent >= TICKS_TO_DEATH:
                self._timer = None
                self.dead()
                return
        self.read_seen = False
        self._timer = self.loop.call_later(self._interval, self._tick)
