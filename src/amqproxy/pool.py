"""Pools of upstream connections keyed by credentials: placement, parking, limits, reaping.

A pool exists for one (user, password, vhost). It holds the upstream connections opened with
exactly those credentials, the clean channels parked on them, the clients it has admitted, and
the messages of its outbox that wait for a channel: replayed after a lost connection, or
accepted while the broker was unreachable (the outage hold).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from amqproxy.amqp import constants as c
from amqproxy.amqp.auth import Credentials, display
from amqproxy.channel import ChannelState, Client, Connection, Lease, UpstreamChannel
from amqproxy.config import Settings
from amqproxy.delivery import Redelivery
from amqproxy.errors import UpstreamRefused, retrieve
from amqproxy.outbox import Totals

log = logging.getLogger("amqproxy.pool")


@dataclass
class PoolStats:
    """Monotonic counters per (user, vhost), kept after a pool is gone."""

    connects: int = 0
    connect_failures: int = 0
    channel_opens: int = 0
    channel_reuses: int = 0
    orphan_channel_errors: int = 0
    replayed: int = 0  # messages published again after their channel or connection died
    refused: int = 0  # messages the broker refused (nack or channel error) for a client that
    #                   did not select confirms: logged, never retried
    # Clients' traffic: bytes counted per read and write, messages per scanner run.
    bytes_in: int = 0  # read from clients
    bytes_out: int = 0  # written to clients
    messages_in: int = 0  # published by clients
    messages_out: int = 0  # delivered to clients (Basic.Deliver, Basic.GetOk)


PoolKey = tuple[bytes, bytes, bytes]  # user, password, vhost: the client's bytes
# Opens an upstream connection for a pool, handshake done (broker.Connector does it).
Connect = Callable[["Pool"], Awaitable[Connection]]


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
        self.parked: list[UpstreamChannel] = []
        self.settling: set[UpstreamChannel] = set()
        self.clients: set[Client] = set()
        self._connecting: asyncio.Future[Connection] | None = None
        self._verifying: asyncio.Future[Connection] | None = None  # a credentials probe
        self.verified_at = float("-inf")  # when the broker last accepted these credentials
        self.delivery = Redelivery(self)  # outbox messages waiting for a channel
        self.outage_since: float | None = None  # no upstream could be kept or opened since
        self._upstream_back = asyncio.Event()  # set while the pool is not in an outage
        self._upstream_back.set()
        self.waiters = 0  # client channels waiting for the outage to end

    def __repr__(self) -> str:
        return f"<Pool {self.user}@{self.vhost}>"

    # ---- admission --------------------------------------------------------------------------

    def live_upstream(self) -> Connection | None:
        for conn in self.upstreams:
            if conn.open:
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
        """The broker is unreachable, for less than ``outbox_hold`` seconds so far: admitted
        clients keep working and what they publish waits in the outbox."""
        since = self.outage_since
        if since is None:
            return False
        return asyncio.get_running_loop().time() - since < self.settings.outbox_hold

    def _enter_outage(self) -> None:
        if self.outage_since is None and self.live_upstream() is None:
            self.outage_since = asyncio.get_running_loop().time()
            self._upstream_back.clear()

    def _leave_outage(self) -> None:
        if self.outage_since is not None:
            held = asyncio.get_running_loop().time() - self.outage_since
            log.info("upstream for %s@%s is back after %.1fs", self.user, self.vhost, held)
        self.outage_since = None
        self._upstream_back.set()

    async def authenticate(self) -> None:
        """Prove the credentials: trusted recently, or by the broker again. With no live
        connection the new one then serves the pool; with one, the proof is a probe that
        closes at once (otherwise every ``credential_ttl`` would leave one more connection
        behind while the pool is busy)."""
        if self.trusted():
            return
        if self.live_upstream() is None:
            await self.connect()
            return
        if self._verifying is None:
            self._verifying = asyncio.ensure_future(self._connect(keep=False))
            self._verifying.add_done_callback(retrieve)
        attempt = self._verifying
        try:
            await asyncio.shield(attempt)
        finally:
            if attempt.done() and self._verifying is attempt:
                self._verifying = None

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
            level = logging.WARNING if self.outage_since is None else logging.DEBUG
            log.log(level, "upstream for %s@%s: %s", self.user, self.vhost, exc.text)
            self.registry.upstream_reachable = exc.reachable
            self._enter_outage()
        else:
            log.info("upstream refused %s@%s: %d %s", self.user, self.vhost, exc.code, exc.text)
            self.registry.upstream_reachable = True

    async def _connect(self, keep: bool = True) -> Connection:
        """A new upstream connection with the pool's credentials; ``keep``: it joins the pool,
        else it closes as soon as the broker accepted them (a probe)."""
        loop = asyncio.get_running_loop()
        try:
            conn = await self.registry.connect(self)
        except UpstreamRefused as exc:
            self.stats.connect_failures += 1
            self._connect_failed(exc)
            raise
        self.registry.upstream_reachable = True
        self.registry.frame_max = conn.frame_max
        self.verified_at = loop.time()
        self.stats.connects += 1
        if not keep:
            log.debug("credentials of %s@%s accepted again (probe)", self.user, self.vhost)
            conn.close("amqproxy: credentials verified")
            return conn
        self.upstreams.append(conn)
        self._leave_outage()
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

    def open_now(self, preferred: int = 0, confirm: bool = True) -> UpstreamChannel | None:
        """A new upstream channel on a live connection with room, usable at once: Channel.Open
        (and Confirm.Select) go out now and the client's frames follow them, so nobody waits
        for the broker's OpenOk. None when every connection is full or none is live."""
        for conn in self.upstreams:
            if conn.open and conn.free_channels > 0:
                self.stats.channel_opens += 1
                return conn.open_channel(preferred, confirm)
        return None

    async def new_channel(self, preferred: int = 0, confirm: bool = True) -> UpstreamChannel:
        """A new upstream channel, connecting first when no live connection has room; while an
        outage is held, waiting (up to ``outbox_hold``) for the broker to come back."""
        while True:
            up = self.open_now(preferred, confirm)
            if up is not None:
                return up
            try:
                await self.connect()
                continue
            except UpstreamRefused as exc:
                if exc.code != c.CONNECTION_FORCED or not self.holding():
                    raise
            await self._wait_for_upstream()

    async def _wait_for_upstream(self) -> None:
        """Wait until the outage ends; UpstreamRefused 320 when the hold runs out first."""
        loop = asyncio.get_running_loop()
        since = self.outage_since if self.outage_since is not None else loop.time()
        remaining = since + self.settings.outbox_hold - loop.time()
        self.waiters += 1
        self.delivery.ensure_recovery()
        try:
            await asyncio.wait_for(self._upstream_back.wait(), max(remaining, 0.0))
        except TimeoutError:
            raise UpstreamRefused(
                c.CONNECTION_FORCED,
                f"CONNECTION_FORCED - broker unreachable for {self.settings.outbox_hold:g}s",
            ) from None
        finally:
            self.waiters -= 1

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
        if up.dirty is not None:
            log.debug("closing upstream channel %s/%d: %s", up.conn.name, up.id, up.dirty)
            up.conn.close_channel(up, f"amqproxy: {why}")
        elif up.settled:
            up.settling_since = now  # parked since, for PARKED_IDLE
            self.parked.append(up)
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

    # ---- housekeeping -----------------------------------------------------------------------

    def upstream_closed(self, conn: Connection, lost: bool) -> None:
        """``conn`` is gone; ``lost``: it was open and we did not close it (an outage starts
        unless another connection of the pool is live)."""
        if conn in self.upstreams:
            self.upstreams.remove(conn)
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
            and not self.delivery.pending
            and not self.waiters
            and not self.holding()
        )

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

    def pool(self, credentials: Credentials, vhost: bytes) -> Pool:
        key = (credentials.user, credentials.password, vhost)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(self, key)
        return pool

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
