"""Errors that cross layers, and the one asyncio helper the core needs to keep futures quiet."""

from __future__ import annotations

import asyncio
from typing import Any


class UpstreamRefused(Exception):
    """No upstream connection or channel: the broker refused it, dropped it, or could not be
    reached. ``code`` and ``text`` go to the client; ``reachable`` says whether the broker
    answered at all (a refusal of credentials is not an outage)."""

    def __init__(self, code: int, text: str, reachable: bool = True) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text
        self.reachable = reachable


class NoChannelFree(UpstreamRefused):
    """The pool is at ``--max-upstream-connections`` and no channel was freed within
    ``--pool-wait-timeout``: an error for that one client channel, not for the connection."""


def retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: its waiter may have timed out and gone."""
    if not future.cancelled():
        future.exception()
