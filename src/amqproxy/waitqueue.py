"""A first-come-first-served queue of tasks waiting for something to be freed: the Channel.Open
of a pool at ``--max-upstream-connections`` waiting for a channel (``pool.Pool.room``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class WaitQueue:
    """Who waits, first come first served, for a channel of a pool at its connection limit.

    A freed channel (parked, or its id free again) or connection wakes the first waiter; a
    waiter woken for nothing (someone else took it) waits again at the head of the queue. A
    woken waiter stays in the queue until it has run: meanwhile the queue is not empty, and
    a newcomer does not take what was freed for it."""

    def __init__(self) -> None:
        self.waiters: deque[asyncio.Future[None]] = deque()  # truthy: someone waits

    def __len__(self) -> int:
        return len(self.waiters)

    async def wait(self, deadline: float, first: bool = False) -> None:
        """Until woken; TimeoutError at ``deadline`` (the event loop's time)."""
        waiter = asyncio.get_running_loop().create_future()
        if first:
            self.waiters.appendleft(waiter)
        else:
            self.waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                self.wake_one()  # woken in the same turn as the timeout: pass it on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)

    def wake_one(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
                return

    def wake_all(self) -> None:
        """The limits changed (a reload): everyone looks again."""
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
