"""The outage hold of one pool: while the broker cannot be reached, for up to --outbox-hold
seconds, admitted clients keep working and what they publish waits in the outbox
(README, "Short broker outages are invisible to publishers")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from amqproxy.amqp import constants as c
from amqproxy.errors import UpstreamRefused

log = logging.getLogger("amqproxy.pool")


class Outage:
    """Since when no upstream of the pool could be kept or opened, and who waits for one."""

    def __init__(self, name: str, hold: Callable[[], float]) -> None:
        self.name = name  # user@vhost, for logs
        self.hold = hold  # --outbox-hold now (a reload may change it)
        self.since: float | None = None
        self.waiters = 0  # client channels waiting for the outage to end
        self._back = asyncio.Event()  # set while there is no outage
        self._back.set()

    def holding(self) -> bool:
        """The broker is unreachable, for less than the hold so far."""
        if self.since is None:
            return False
        return asyncio.get_running_loop().time() - self.since < self.hold()

    def begin(self) -> None:
        if self.since is None:
            self.since = asyncio.get_running_loop().time()
            self._back.clear()

    def end(self) -> None:
        if self.since is not None:
            held = asyncio.get_running_loop().time() - self.since
            log.info("upstream for %s is back after %.1fs", self.name, held)
        self.since = None
        self._back.set()

    async def wait(self) -> None:
        """Until the outage ends; UpstreamRefused 320 when the hold runs out first."""
        loop = asyncio.get_running_loop()
        since = self.since if self.since is not None else loop.time()
        remaining = since + self.hold() - loop.time()
        self.waiters += 1
        try:
            await asyncio.wait_for(self._back.wait(), max(remaining, 0.0))
        except TimeoutError:
            raise UpstreamRefused(
                c.CONNECTION_FORCED,
                f"CONNECTION_FORCED - broker unreachable for {self.hold():g}s",
            ) from None
        finally:
            self.waiters -= 1
