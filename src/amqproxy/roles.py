"""Roles of a pool's upstream connections: publishers apart from consumers.

RabbitMQ stops reading a connection that publishes while a memory or disk alarm lasts, and
slows one that publishes faster than its queues take (credit flow). On a direct connection a
consumer that shares it waits too: its acks, ``Basic.Consume`` and ``Basic.Cancel`` are not
read, so its deliveries stop. RabbitMQ's advice is one connection to publish and another to
consume; the proxy follows it for its clients. Each upstream connection of a pool has a role:

- ``publish``: where ``Channel.Open`` lands (parked channels are publish channels);
- ``consume``: where a channel moves when its client starts to consume on it
  (``core.split`` decides; the client channel table moves it).

At ``--max-upstream-connections`` the split gives way: a consumer that would need a new
connection stays on its publish connection, and a ``Channel.Open`` that finds every publish
connection full takes a channel on a consume connection rather than wait. No I/O here but the
pool's own connect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from amqproxy.channel import Connection, UpstreamChannel
from amqproxy.config import Settings
from amqproxy.errors import UpstreamRefused, retrieve

log = logging.getLogger("amqproxy.pool")

PUBLISH = "publish"
CONSUME = "consume"


class Stats(Protocol):
    channel_opens: int
    consumer_moves: int


class Room(Protocol):
    def __len__(self) -> int: ...

    def wake_one(self) -> None: ...


class PoolSide(Protocol):
    """What the roles need of their pool (``pool.Pool``)."""

    settings: Settings
    upstreams: list[Connection]
    retired: set[Connection]

    @property
    def room(self) -> Room: ...

    @property
    def stats(self) -> Stats: ...

    @property
    def name(self) -> str: ...

    def at_connection_limit(self) -> bool: ...

    def connection_count(self) -> int: ...


class Roles:
    """Placement by role for one pool, and its shared attempt to open a consume connection."""

    def __init__(self, pool: PoolSide, connect: Callable[[], Awaitable[Connection]]) -> None:
        self.pool = pool
        self._connect = connect  # a new connection of the pool, with the consume role
        self._connecting: asyncio.Future[Connection] | None = None

    @property
    def enabled(self) -> bool:
        return self.pool.settings.split_consumers

    @property
    def connecting(self) -> int:
        """Consume connections being opened (0 or 1: one attempt is shared)."""
        return 0 if self._connecting is None else 1

    def _usable(self, conn: Connection) -> bool:
        return conn.open and conn.free_channels > 0 and conn not in self.pool.retired

    def publish_connection(self) -> Connection | None:
        """Where a new publish channel goes: a publish connection with room; when no more
        connections may be opened, any connection with room (a consume one rather than a
        wait at the limit). With the split off, any connection with room."""
        fallback = None
        for conn in self.pool.upstreams:
            if not self._usable(conn):
                continue
            if conn.role == PUBLISH or not self.enabled:
                return conn
            fallback = fallback or conn
        if fallback is not None and self.pool.at_connection_limit():
            return fallback
        return None

    def consume_connection(self, near: Connection | None, clean: bool = False) -> Connection | None:
        """A consume connection with room: ``near`` (where the client's other consumers and
        its exclusive queues are) if it can, else the first where nobody publishes (a channel
        that consumes and publishes would have the broker block it), else (unless ``clean``)
        the first with room."""
        if near is not None and near.role == CONSUME and self._usable(near):
            return near
        fallback = None
        for conn in self.pool.upstreams:
            if conn.role == CONSUME and self._usable(conn):
                if not any(up.published for up in conn.channels.values()):
                    return conn
                fallback = fallback or conn
        return None if clean else fallback

    def may_connect(self) -> bool:
        """A consume connection may be opened (or is being opened) without going past
        ``--max-upstream-connections``."""
        limit = self.pool.settings.max_upstream_connections
        return self._connecting is not None or not limit or self.pool.connection_count() < limit

    def has_room(self, near: Connection | None) -> bool:
        """A channel on a consume connection can be had without waiting for room."""
        return self.consume_connection(near) is not None or self.may_connect()

    def channel_now(self, preferred: int, near: Connection | None) -> UpstreamChannel | None:
        """A new channel (in the proxy's confirm mode) on a consume connection, usable at
        once; None when no consume connection has room."""
        conn = self.consume_connection(near)
        if conn is None:
            return None
        self.pool.stats.channel_opens += 1
        self.pool.stats.consumer_moves += 1
        return conn.open_channel(preferred, True)

    async def channel(self, preferred: int, near: Connection | None) -> UpstreamChannel | None:
        """A channel on a consume connection, opening one first when none has room (or all
        those with room carry publishes too) and the limit allows; None when none can be had
        (the connection failed): the caller then places the channel as any other."""
        if self.consume_connection(near, clean=True) is None and self.may_connect():
            try:
                await self.connect()
            except (UpstreamRefused, TimeoutError) as exc:
                log.debug("no new consume connection for %s: %s", self.pool.name, exc)
        return self.channel_now(preferred, near)

    async def connect(self) -> Connection:
        """Open one more consume connection; concurrent callers share one attempt. Whoever
        waits for room at the limit looks again once it is done."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(retrieve)
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, attempt: asyncio.Future[Connection]) -> None:
        if self._connecting is attempt:
            self._connecting = None
        if self.pool.room:
            self.pool.room.wake_one()
