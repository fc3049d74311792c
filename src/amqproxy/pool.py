"""Pools of upstream connections keyed by credentials: placement, parking, limits, reaping.

A pool exists for one (user, password, vhost). It holds the upstream connections opened with
exactly those credentials, the clean channels parked on them, and the clients it has admitted.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from amqproxy.amqp import constants as c
from amqproxy.channel import ChannelState, Lease, UpstreamChannel
from amqproxy.config import Settings
from amqproxy.upstream import DEFAULT_FRAME_MAX, UpstreamConnection, UpstreamRefused

if TYPE_CHECKING:
    from amqproxy.client import ClientConnection

log = logging.getLogger("amqproxy.pool")

SETTLE_TIMEOUT = 30.0  # a released channel whose replies never come is closed after this


@dataclass
class PoolStats:
    """Monotonic counters per (user, vhost), kept after a pool is gone."""

    connects: int = 0
    connect_failures: int = 0
    channel_opens: int = 0
    channel_reuses: int = 0
    orphan_channel_errors: int = 0


PoolKey = tuple[str, str, str]  # user, password, vhost


class Pool:
    """Upstream connections and parked channels for one set of credentials."""

    def __init__(self, registry: PoolRegistry, key: PoolKey) -> None:
        self.registry = registry
        self.settings = registry.settings
        self.key = key
        self.user, self.password, self.vhost = key
        self.stats = registry.stats[(self.user, self.vhost)]
        self.upstreams: list[UpstreamConnection] = []
        self.parked: list[UpstreamChannel] = []
        self.settling: set[UpstreamChannel] = set()
        self.clients: set[ClientConnection] = set()
        self.exclusive_owners: dict[str, ClientConnection] = {}  # queue -> declaring client
        self._connecting: asyncio.Future[UpstreamConnection] | None = None
        self.verified_at = float("-inf")  # when the broker last accepted these credentials

    def __repr__(self) -> str:
        return f"<Pool {self.user}@{self.vhost}>"

    # ---- admission --------------------------------------------------------------------------

    def live_upstream(self) -> UpstreamConnection | None:
        for conn in self.upstreams:
            if conn.open:
                return conn
        return None

    def trusted(self) -> bool:
        """The broker accepted these credentials less than ``credential_ttl`` seconds ago and an
        upstream opened with them is live: a client may be admitted without asking again."""
        age = asyncio.get_running_loop().time() - self.verified_at
        return age < self.settings.credential_ttl and self.live_upstream() is not None

    async def authenticate(self) -> None:
        """Prove the credentials: trusted recently, or by a new upstream connection (which then
        serves the pool like any other)."""
        if not self.trusted():
            await self.connect()

    def max_channels(self, conn: UpstreamConnection) -> int:
        configured = self.settings.max_upstream_channels
        return min(configured, conn.channel_max) if configured else conn.channel_max

    async def connect(self) -> UpstreamConnection:
        """Open one more upstream connection; concurrent callers share one attempt."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        attempt = self._connecting
        try:
            return await asyncio.shield(attempt)
        finally:
            if attempt.done() and self._connecting is attempt:
                self._connecting = None

    async def _connect(self) -> UpstreamConnection:
        settings = self.settings
        loop = asyncio.get_running_loop()
        conn = UpstreamConnection(self, self.registry.next_serial())
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: conn,
                    settings.upstream_host,
                    settings.upstream_port,
                    ssl=self.registry.ssl_context,
                    server_hostname=settings.upstream_host if settings.upstream_tls else None,
                ),
                settings.connect_timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.stats.connect_failures += 1
            reason = str(exc) or type(exc).__name__
            log.warning("upstream connect to %s failed: %s", settings.upstream_address, reason)
            self.registry.upstream_reachable = False
            raise UpstreamRefused(
                c.CONNECTION_FORCED, f"CONNECTION_FORCED - broker unreachable: {reason}"
            ) from None
        try:
            await asyncio.wait_for(asyncio.shield(conn.ready), settings.handshake_timeout)
        except TimeoutError:
            self.stats.connect_failures += 1
            if conn.transport is not None:
                conn.transport.abort()
            log.warning("upstream handshake with %s timed out", settings.upstream_address)
            raise UpstreamRefused(
                c.CONNECTION_FORCED, "CONNECTION_FORCED - broker handshake timed out"
            ) from None
        except UpstreamRefused as exc:
            self.stats.connect_failures += 1
            log.info("upstream refused %s@%s: %d %s", self.user, self.vhost, exc.code, exc.text)
            self.registry.upstream_reachable = True
            raise
        self.registry.upstream_reachable = True
        self.registry.frame_max = conn.frame_max
        self.verified_at = loop.time()
        self.upstreams.append(conn)
        self.stats.connects += 1
        log.info(
            "upstream %s connected from %s (channel_max=%d frame_max=%d heartbeat=%d)",
            conn.name,
            conn.peer,
            conn.channel_max,
            conn.frame_max,
            conn.heartbeat,
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

    async def new_channel(self, preferred: int = 0) -> UpstreamChannel:
        """Open a channel upstream on a connection with room, connecting if all are full."""
        conn = (
            next((u for u in self.upstreams if u.open and u.free_channels > 0), None)
            or await self.connect()
        )
        if conn.free_channels <= 0:  # raced with other openers
            conn = await self.connect()
        fut = conn.open_channel(preferred)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.settings.handshake_timeout)
        except TimeoutError:
            fut.cancel()  # a late OpenOk then parks the channel for someone else
            raise

    def bind(self, lease: Lease, up: UpstreamChannel) -> None:
        lease.bind(up)
        up.conn.on_lease_change(+1)

    def release(self, lease: Lease, why: str) -> None:
        """The client is done with this lease: park, settle or close the upstream channel."""
        up = lease.up
        if up is not None and up.conn.pool is not self:  # the client moved (UpdateSecret)
            up.conn.pool.release(lease, why)
            return
        lease.up = None
        if up is None:
            return
        up.lease = None
        if up.conn.closed:
            return
        up.conn.on_lease_change(-1)
        if up.state is ChannelState.CLOSING:
            return
        if not self.settings.park_channels:
            up.mark_dirty("parking disabled")
        if lease.pub_stage:
            lease.drop_partial_publish()
        self._settle_or_park(up, why)

    def release_unleased(self, up: UpstreamChannel) -> None:
        """A channel that opened after its would-be client left."""
        self._settle_or_park(up, "opened after its client left")

    def _settle_or_park(self, up: UpstreamChannel, why: str) -> None:
        if up.dirty is not None:
            log.debug("closing upstream channel %s/%d: %s", up.conn.name, up.id, up.dirty)
            up.conn.close_channel(up, f"amqproxy: {why}")
        elif up.settled:
            self.parked.append(up)
        else:
            up.settling_since = up.conn.loop.time()
            self.settling.add(up)

    def maybe_settled(self, up: UpstreamChannel) -> None:
        """Called when a reply or confirm arrives for a channel nobody leases."""
        if up in self.settling and up.settled:
            self.settling.discard(up)
            self._settle_or_park(up, "settled")

    def channel_gone(self, up: UpstreamChannel) -> None:
        self.settling.discard(up)
        if up in self.parked:
            self.parked.remove(up)

    def orphan_channel_error(self, up: UpstreamChannel, code: int, text: str) -> None:
        """An asynchronous channel error arrived after the client that caused it had left."""
        self.stats.orphan_channel_errors += 1
        log.warning(
            "channel error after its client left (client %s, upstream %s channel %d): %d %s",
            up.last_client or "?",
            up.conn.name,
            up.id,
            code,
            text,
        )

    # ---- housekeeping -----------------------------------------------------------------------

    def upstream_closed(self, conn: UpstreamConnection) -> None:
        if conn in self.upstreams:
            self.upstreams.remove(conn)
        self.parked = [up for up in self.parked if up.conn is not conn]
        self.settling = {up for up in self.settling if up.conn is not conn}
        self.registry.maybe_drop(self)

    def client_added(self, client: ClientConnection) -> None:
        self.clients.add(client)

    def client_gone(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        now = asyncio.get_running_loop().time()
        for conn in self.upstreams:
            if conn.leased == 0:
                conn.last_used = max(conn.last_used, now)
        self.registry.maybe_drop(self)

    def sweep(self, now: float) -> None:
        """Close idle upstreams and channels that never settled."""
        for up in list(self.settling):
            if now - up.settling_since > SETTLE_TIMEOUT:
                up.mark_dirty("did not settle")
                self.settling.discard(up)
                up.conn.close_channel(up, "amqproxy: did not settle")
        timeout = self.settings.idle_connection_timeout
        if timeout <= 0:
            return
        for conn in list(self.upstreams):
            if not conn.open or conn.leased or now - conn.last_used < timeout:
                continue
            if self.clients and sum(1 for u in self.upstreams if u.open) == 1:
                continue  # admitted clients keep one connection to open channels on
            log.info("closing idle upstream %s (unused for %.1fs)", conn.name, now - conn.last_used)
            conn.close("idle")

    @property
    def empty(self) -> bool:
        return not self.clients and not self.upstreams and self._connecting is None

    def counts(self) -> dict[str, int]:
        return {
            "clients": len(self.clients),
            "upstreams": sum(1 for u in self.upstreams if u.open),
            "parked": len(self.parked),
            "leased": sum(u.leased for u in self.upstreams),
            "settling": len(self.settling),
        }


class PoolRegistry:
    """All pools, the upstream address and what was learned from the broker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pools: dict[PoolKey, Pool] = {}
        self.stats: defaultdict[tuple[str, str], PoolStats] = defaultdict(PoolStats)
        self.server_properties: dict[str, Any] | None = None
        self.upstream_reachable: bool | None = None
        self.frame_max = DEFAULT_FRAME_MAX  # the broker's, once an upstream has tuned
        self.ssl_context = settings.upstream_ssl_context()
        self._serial = 0

    def next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def pool(self, user: str, password: str, vhost: str) -> Pool:
        key = (user, password, vhost)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(self, key)
        return pool

    def maybe_drop(self, pool: Pool) -> None:
        """Forget a pool with no clients and no connections (e.g. failed credentials)."""
        if pool.empty and self.pools.get(pool.key) is pool:
            del self.pools[pool.key]

    def learn_server_properties(self, properties: dict[str, Any]) -> None:
        self.server_properties = properties

    def sweep(self, now: float) -> None:
        for pool in list(self.pools.values()):
            pool.sweep(now)

    def close_all(self) -> None:
        for pool in list(self.pools.values()):
            for conn in list(pool.upstreams):
                conn.close("amqproxy shutting down")

    @property
    def upstream_count(self) -> int:
        return sum(len(p.upstreams) for p in self.pools.values())
