"""Pools of upstream connections keyed by credentials: placement, parking, limits, reaping.

A pool exists for one (user, password, vhost). It holds the upstream connections opened with
exactly those credentials, the clean channels parked on them, the clients it has admitted, and
the messages of its outbox that wait for a channel: replayed after a lost connection, or
accepted while the broker was unreachable (the outage hold).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Protocol

from amqproxy.amqp import constants as c
from amqproxy.amqp.auth import Credentials, display
from amqproxy.channel import ChannelState, Client, Connection, Lease, UpstreamChannel
from amqproxy.config import Settings
from amqproxy.delivery import Redelivery
from amqproxy.errors import NoChannelFree, UpstreamRefused, retrieve
from amqproxy.outage import Outage
from amqproxy.outbox import Totals
from amqproxy.roles import CONSUME, PUBLISH, Roles
from amqproxy.stats import PoolStats
from amqproxy.waitqueue import WaitQueue

log = logging.getLogger("amqproxy.pool")


PoolKey = tuple[bytes, bytes, bytes]  # user, password, vhost: the client's bytes
# Opens an upstream connection for a pool, handshake done (``broker.Broker.connect``), or
# finishes one whose broker already accepted the credentials (``broker.Login.finish``).
Connect = Callable[["Pool"], Awaitable[Connection]]


class Login(Protocol):
    """An upstream connection whose broker accepted the credentials, waiting for a vhost
    (``broker.Login``)."""

    async def finish(self, pool: Pool) -> Connection: ...

    def abandon(self) -> None: ...


class Pool:
    """Upstream connections and parked channels for one set of credentials."""

    def __init__(self, registry: PoolRegistry, key: PoolKey) -> None:
        self.registry = registry
        self.settings = registry.settings
        self.key = key
        self.credentials = Credentials(key[0], key[1])
        self.vhost_bytes = key[2]
        self.user, self.vhost = display(key[0]), display(key[2])  # for logs and metrics
        self.stats = registry.stats[(self.user, self.vhost)]
        self.upstreams: list[Connection] = []
        # Connected to an upstream address a reload replaced: they serve the channels they
        # have, take no new ones, and close once nothing is leased or settling on them.
        self.retired: set[Connection] = set()
        self.room = WaitQueue()  # Channel.Open waiting at --max-upstream-connections
        self.parked: list[UpstreamChannel] = []
        self.settling: set[UpstreamChannel] = set()
        self.clients: set[Client] = set()
        self._connecting: asyncio.Future[Connection] | None = None
        self._proving: asyncio.Future[Connection] | None = None  # credentials being proven
        self.verified_at = float("-inf")  # when the broker last accepted these credentials
        self.delivery = Redelivery(self)  # outbox messages waiting for a channel
        self.outage = Outage(self.name, lambda: self.settings.outbox_hold)
        self.roles = Roles(self, functools.partial(self._connect, role=CONSUME))  # roles.py

    def __repr__(self) -> str:
        return f"<Pool {self.name}>"

    @property
    def name(self) -> str:
        """user@vhost, for logs and metrics (the password never appears)."""
        return f"{self.user}@{self.vhost}"

    # ---- admission --------------------------------------------------------------------------

    def live_upstream(self) -> Connection | None:
        """An open connection to the current upstream address."""
        for conn in self.upstreams:
            if conn.open and conn not in self.retired:
                return conn
        return None

    def trusted(self) -> bool:
        """The broker accepted these credentials less than ``credential_ttl`` seconds ago and an
        upstream opened with them is live (or its loss is being held): a client may be admitted
        without asking again."""
        age = asyncio.get_running_loop().time() - self.verified_at
        if age >= self.settings.credential_ttl:
            return False
        return self.live_upstream() is not None or self.holding()

    def holding(self) -> bool:
        """An outage is being held (``outage.Outage``)."""
        return self.outage.holding()

    def _enter_outage(self) -> None:
        if self.live_upstream() is None:
            self.outage.begin()

    @property
    def waiters(self) -> int:
        """Client channels waiting for the broker to come back."""
        return self.outage.waiters

    async def authenticate(self, login: Login | None = None) -> None:
        """Prove the credentials: trusted recently, or by the broker again — on ``login`` (the
        broker accepted the password on it at StartOk; its Open for this pool's vhost is the
        rest of the proof) or on a new connection, which callers without a login share with
        the proof under way. A proof joins the pool if the pool has no live connection once it
        is open (decided after the await: concurrent cold clients must not each keep one),
        else it closes (or every ``credential_ttl`` would leave one more connection behind)."""
        attempt: asyncio.Future[Connection]
        if login is not None:
            attempt = asyncio.ensure_future(self._connect(keep=None, opener=login.finish))
            attempt.add_done_callback(retrieve)
            self._proving = self._proving or attempt
        elif self.trusted():
            return
        elif self._proving is not None:
            attempt = self._proving
        else:
            attempt = self._proving = asyncio.ensure_future(self._connect(keep=None))
            attempt.add_done_callback(retrieve)
        try:
            await asyncio.shield(attempt)
        finally:
            if attempt.done() and self._proving is attempt:
                self._proving = None

    def max_channels(self, conn: Connection) -> int:
        configured = self.settings.max_upstream_channels
        return min(configured, conn.channel_max) if configured else conn.channel_max

    async def connect(self) -> Connection:
        """Open one more upstream connection; concurrent callers share one attempt."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(retrieve)
        attempt = self._connecting
        try:
            return await asyncio.shield(attempt)
        finally:
            if attempt.done() and self._connecting is attempt:
                self._connecting = None

    def _connect_failed(self, exc: UpstreamRefused) -> None:
        """Log a failed attempt once per outage, and start or extend the outage: a broker
        that does not answer (or drops us in the handshake) is one, refused credentials not."""
        if not exc.reachable or exc.code == c.CONNECTION_FORCED:
            level = logging.WARNING if self.outage.since is None else logging.DEBUG
            fields = {"event": "upstream.unreachable", "pool": self.name, "reason": exc.text}
            log.log(level, "upstream for %s: %s", self.name, exc.text, extra=fields)
            self.registry.upstream_reachable = exc.reachable
            self._enter_outage()
        else:
            log.debug("upstream refused %s@%s: %d %s", self.user, self.vhost, exc.code, exc.text)
            self.registry.upstream_reachable = True

    async def _connect(
        self, keep: bool | None = True, opener: Connect | None = None, role: str = PUBLISH
    ) -> Connection:
        """A new upstream connection with the pool's credentials; ``keep``: it joins the pool
        in ``role``, else it closes as soon as the broker accepted them (a probe); None: it
        joins only if the pool has no live connection by the time it is open."""
        loop = asyncio.get_running_loop()
        try:
            conn = await (opener or self.registry.connect)(self)
        except UpstreamRefused as exc:
            self.stats.connect_failures += 1
            self._connect_failed(exc)
            raise
        self.registry.upstream_reachable = True
        self.registry.frame_max = conn.frame_max
        self.verified_at = loop.time()
        self.stats.connects += 1
        if keep is None:
            keep = self.live_upstream() is None
        if not keep:
            log.debug("credentials of %s@%s accepted again (probe)", self.user, self.vhost)
            conn.close("amqproxy: credentials verified")
            return conn
        conn.role = role
        self.upstreams.append(conn)
        self.outage.end()
        log.info(
            "upstream %s (%s) connected from %s (channel_max=%d frame_max=%d heartbeat=%d)",
            conn.name,
            role,
            conn.peer,
            conn.channel_max,
            conn.frame_max,
            conn.heartbeat,
            extra={"event": "upstream.connected", "pool": self.name, "upstream": conn.name},
        )
        return conn

    # ---- leases -----------------------------------------------------------------------------

    def take_parked(self, preferred: int = 0) -> UpstreamChannel | None:
        """A parked clean channel: one with the client's own id if among the most recent
        (its frames then pass without a rewrite), else the most recently parked."""
        parked = self.parked
        for index in range(len(parked) - 1, max(len(parked) - 9, -1), -1):
            up = parked[index]
            if up.id == preferred and up.conn.open and up.reusable:
                del parked[index]
                self.stats.channel_reuses += 1
                return up
        while self.parked:
            up = self.parked.pop()
            if up.conn.open and up.reusable:
                self.stats.channel_reuses += 1
                return up
        return None

    def open_now(self, preferred: int = 0, confirm: bool = True) -> UpstreamChannel | None:
        """A new upstream channel on a live publish connection with room (``roles``), usable
        at once: Channel.Open (and Confirm.Select) go out now and the client's frames follow
        them, so nobody waits for the broker's OpenOk. None when every one is full or none is
        live."""
        conn = self.roles.publish_connection()
        if conn is None:
            return None
        self.stats.channel_opens += 1
        return conn.open_channel(preferred, confirm)

    async def new_channel(self, preferred: int = 0, confirm: bool = True) -> UpstreamChannel:
        """An upstream channel: a new one, connecting first when no live connection has room;
        at ``--max-upstream-connections``, the next one freed (parked or closed), waiting up to
        ``--pool-wait-timeout``; while an outage is held, waiting (up to ``outbox_hold``) for
        the broker to come back."""
        loop = asyncio.get_running_loop()
        waiting_since: float | None = None  # at the connection limit since
        try:
            while True:
                waited = waiting_since is not None
                up = (self.take_parked(preferred) if confirm and waited else None) or (
                    self.open_now(preferred, confirm)
                )
                if up is not None:
                    if waited and self.room.waiters:
                        self.room.wake_one()  # there may be room for the next one too
                    return up
                if self.at_connection_limit():
                    if waiting_since is None:
                        waiting_since = loop.time()
                        self.stats.channel_waits += 1
                    await self._wait_for_room(waiting_since, first=waited)
                    continue
                try:
                    await self.connect()
                    continue
                except UpstreamRefused as exc:
                    if exc.code != c.CONNECTION_FORCED or not self.holding():
                        raise
                await self._wait_for_upstream()
        finally:
            if waiting_since is not None:
                self.stats.channel_wait_seconds += loop.time() - waiting_since

    def at_connection_limit(self) -> bool:
        """``--max-upstream-connections`` to the current address are open or opening (one
        opening attempt is shared by everyone, so it does not block the others)."""
        limit = self.settings.max_upstream_connections
        if not limit or self._connecting is not None:
            return False
        return self.connection_count() >= limit

    def connection_count(self) -> int:
        """Connections to the current address, open or being opened (any role)."""
        opening = (self._connecting is not None) + self.roles.connecting
        return len(self.upstreams) - len(self.retired) + opening

    async def _wait_for_room(self, started: float, first: bool) -> None:
        """Wait for a channel or connection to be freed; NoChannelFree when
        ``--pool-wait-timeout`` seconds after ``started`` none was."""
        timeout = self.settings.pool_wait_timeout
        try:
            await self.room.wait(started + timeout, first)
        except TimeoutError:
            self.stats.channel_wait_timeouts += 1
            limit = self.settings.max_upstream_connections
            raise NoChannelFree(
                c.RESOURCE_ERROR,
                f"RESOURCE_ERROR - no upstream channel free within {timeout:g}s "
                f"(max-upstream-connections {limit})",
            ) from None

    async def more_room(self) -> None:
        """Room for the outbox's messages: a new connection, or at the connection limit a
        wait for a channel to be freed (retried by the caller, never an error)."""
        if not self.at_connection_limit():
            await self.connect()
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(self.settings.pool_wait_timeout, 1.0)
        try:
            await self.room.wait(deadline)
        except TimeoutError:
            return
        # The caller takes what it can; pass the turn on rather than lose it, should what
        # was freed be more than the outbox needs (a waiter that finds nothing waits again).
        self.room.wake_one()

    async def _wait_for_upstream(self) -> None:
        self.delivery.ensure_recovery()
        await self.outage.wait()

    def release(self, lease: Lease, why: str) -> None:
        """The client is done with this lease: park, settle or close the upstream channel."""
        up = lease.up
        if up is None:
            self.delivery.adopt_backlog(lease)
            return
        lease.unbind()
        if up.conn.closed or up.state is ChannelState.CLOSING:
            return
        if not self.settings.park_channels:
            up.mark_dirty("parking disabled")
        lease.message.drop()
        self.settle_or_park(up, why)

    def release_unleased(self, up: UpstreamChannel) -> None:
        """A channel that opened after its would-be client left."""
        self.settle_or_park(up, "opened after its client left")

    def settle_or_park(self, up: UpstreamChannel, why: str) -> None:
        now = asyncio.get_running_loop().time()
        if up.dirty is None and up.conn in self.retired:
            up.mark_dirty("its upstream address was replaced")
        if up.dirty is None and up.conn.role == CONSUME:  # Channel.Open takes publish channels
            up.mark_dirty("on a consume connection")
        if up.dirty is not None:
            log.debug("closing upstream channel %s/%d: %s", up.conn.name, up.id, up.dirty)
            up.conn.close_channel(up, f"amqproxy: {why}")
        elif up.settled:
            up.settling_since = now  # parked since, for PARKED_IDLE
            self.parked.append(up)
            if self.room.waiters:
                self.room.wake_one()
        else:
            up.settling_since = now
            self.settling.add(up)

    def maybe_settled(self, up: UpstreamChannel) -> None:
        """Called when a reply or confirm arrives for a channel nobody leases."""
        if up in self.settling and up.settled:
            self.settling.discard(up)
            self.settle_or_park(up, "settled")

    def channel_gone(self, up: UpstreamChannel) -> None:
        self.settling.discard(up)
        if up in self.parked:
            self.parked.remove(up)
        if self.room.waiters:
            self.room.wake_one()

    # ---- housekeeping -----------------------------------------------------------------------

    def upstream_closed(self, conn: Connection, lost: bool) -> None:
        """``conn`` is gone; ``lost``: it was open and we did not close it (an outage starts
        unless another connection of the pool is live)."""
        if conn in self.upstreams:
            self.upstreams.remove(conn)
        self.retired.discard(conn)
        if self.room.waiters:
            self.room.wake_one()
        self.parked = [up for up in self.parked if up.conn is not conn]
        self.settling = {up for up in self.settling if up.conn is not conn}
        if lost:
            self._enter_outage()
        if self.delivery.pending:
            self.delivery.ensure_recovery()
        self.registry.maybe_drop(self)

    def client_added(self, client: Client) -> None:
        self.clients.add(client)

    def client_gone(self, client: Client) -> None:
        self.clients.discard(client)
        now = asyncio.get_running_loop().time()
        for conn in self.upstreams:
            if conn.leased == 0:
                conn.last_used = max(conn.last_used, now)
        self.registry.maybe_drop(self)

    def retire_upstreams(self, which: Callable[[Connection], bool] = lambda conn: True) -> None:
        """The upstream list changed (a reload): the connections open now to a node no longer
        listed (``which``) keep serving their leased channels and drain; new channels and
        connections go to the listed nodes."""
        self.retired.update(conn for conn in self.upstreams if which(conn))
        for up in [up for up in self.parked if up.conn in self.retired]:
            self.close_channel(up, "its upstream address was replaced")
        self.room.wake_all()

    def close_channel(self, up: UpstreamChannel, why: str) -> None:
        """Close a settling or parked channel the pool no longer wants."""
        up.mark_dirty(why)
        self.channel_gone(up)
        up.conn.close_channel(up, f"amqproxy: {why}")

    @property
    def empty(self) -> bool:
        """Nothing left to keep: no client, connection, waiting message or held outage."""
        return (
            not self.clients
            and not self.upstreams
            and self._connecting is None
            and not self.roles.connecting
            and not self.delivery.pending
            and not self.waiters
            and not self.room
            and not self.holding()
        )


class PoolRegistry:
    """All pools, the upstream address and what was learned from the broker."""

    def __init__(self, settings: Settings, connect: Connect) -> None:
        self.settings = settings
        self.connect = connect  # opens an upstream connection for a pool
        self.pools: dict[PoolKey, Pool] = {}
        self.stats: defaultdict[tuple[str, str], PoolStats] = defaultdict(PoolStats)
        self.upstream_reachable: bool | None = None
        self.frame_max = c.DEFAULT_FRAME_MAX  # the broker's, once an upstream has tuned
        self.outbox = Totals(settings.outbox_max_bytes)
        self.stopped = False  # shutting down: no more reconnection attempts
        self.paused = False  # the admin API's pause: new clients are refused at Connection.Open
        # The broker checking a password at StartOk, per (credentials, mechanism): clients with
        # the same bytes meanwhile wait for that answer rather than log in too (a cold burst).
        # (True: accepted; False: no answer, each asks again; an exception: refused)
        self.checks: dict[tuple[Credentials, str], asyncio.Future[bool]] = {}

    def pool(self, credentials: Credentials, vhost: bytes) -> Pool:
        key = (credentials.user, credentials.password, vhost)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(self, key)
        return pool

    def credentials_trusted(self, credentials: Credentials) -> Pool | None:
        """A pool with exactly these user and password bytes (any vhost) that is trusted: the
        broker accepted them less than --credential-ttl ago."""
        user, password = credentials
        for key, pool in self.pools.items():
            if key[0] == user and key[1] == password and pool.trusted():
                return pool
        return None

    def maybe_drop(self, pool: Pool) -> None:
        """Forget a pool with no clients and no connections (e.g. failed credentials)."""
        if pool.empty and self.pools.get(pool.key) is pool:
            del self.pools[pool.key]

    def holding(self) -> int:
        """How many pools hold an outage now."""
        return sum(1 for pool in self.pools.values() if pool.holding())

    def undelivered(self) -> dict[str, int]:
        """Messages still in the outbox, per ``user@vhost``."""
        counts: dict[str, int] = {}
        for pool in self.pools.values():
            messages = pool.delivery.counts()[0]
            if messages:
                name = f"{pool.user}@{pool.vhost}"
                counts[name] = counts.get(name, 0) + messages
        return counts

    def close_all(self) -> None:
        for pool in list(self.pools.values()):
            for conn in list(pool.upstreams):
                conn.close("amqproxy shutting down")

    @property
    def upstream_count(self) -> int:
        return sum(len(p.upstreams) for p in self.pools.values())
