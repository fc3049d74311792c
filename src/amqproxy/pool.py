"""Pools of upstream connections keyed by credentials: placement, parking, limits, reaping.

A pool exists for one (user, password, vhost). It holds the upstream connections opened with
exactly those credentials, the clean channels parked on them, the clients it has admitted, and
the messages of its outbox that wait for a channel: replayed after a lost connection, or
accepted while the broker was unreachable (the outage hold).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from amqproxy.amqp import constants as c
from amqproxy.amqp.auth import Credentials, display
from amqproxy.amqp.frames import Buffer
from amqproxy.channel import ChannelState, Lease, UpstreamChannel
from amqproxy.config import Settings
from amqproxy.outbox import MAX_ATTEMPTS, Message, Totals, publishes_in, refused_index, unconfirmed
from amqproxy.upstream import DEFAULT_FRAME_MAX, UpstreamConnection, UpstreamRefused, _retrieve

if TYPE_CHECKING:
    from amqproxy.client import ClientConnection

log = logging.getLogger("amqproxy.pool")

SETTLE_TIMEOUT = 30.0  # a released channel whose replies never come is closed after this
PARKED_IDLE = 60.0  # a parked channel nobody took for this long is closed (bursts leave many)
RETRY_FIRST = 0.1  # first pause between reconnection attempts while messages wait
RETRY_MAX = 1.0  # the pause grows to this


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


PoolKey = tuple[bytes, bytes, bytes]  # user, password, vhost: the client's bytes


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
        self.upstreams: list[UpstreamConnection] = []
        self.parked: list[UpstreamChannel] = []
        self.settling: set[UpstreamChannel] = set()
        self.clients: set[ClientConnection] = set()
        self.exclusive_owners: dict[bytes, ClientConnection] = {}  # queue -> declaring client
        self._connecting: asyncio.Future[UpstreamConnection] | None = None
        self._verifying: asyncio.Future[UpstreamConnection] | None = None  # a credentials probe
        self.verified_at = float("-inf")  # when the broker last accepted these credentials
        self.pending: deque[Message] = deque()  # outbox messages waiting for a channel
        self.outage_since: float | None = None  # no upstream could be kept or opened since
        self._upstream_back = asyncio.Event()  # set while the pool is not in an outage
        self._upstream_back.set()
        self._waiters = 0  # client channels waiting for the outage to end
        self._recovery: asyncio.Task[None] | None = None

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
            self._verifying.add_done_callback(_retrieve)
        attempt = self._verifying
        try:
            await asyncio.shield(attempt)
        finally:
            if attempt.done() and self._verifying is attempt:
                self._verifying = None

    def max_channels(self, conn: UpstreamConnection) -> int:
        configured = self.settings.max_upstream_channels
        return min(configured, conn.channel_max) if configured else conn.channel_max

    async def connect(self) -> UpstreamConnection:
        """Open one more upstream connection; concurrent callers share one attempt."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(_retrieve)
        attempt = self._connecting
        try:
            return await asyncio.shield(attempt)
        finally:
            if attempt.done() and self._connecting is attempt:
                self._connecting = None

    async def _connect(self, keep: bool = True) -> UpstreamConnection:
        """A new upstream connection with the pool's credentials; ``keep``: it joins the pool,
        else it closes as soon as the broker accepted them (a probe)."""
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
            level = logging.WARNING if self.outage_since is None else logging.DEBUG
            log.log(level, "upstream connect to %s failed: %s", settings.upstream_address, reason)
            self.registry.upstream_reachable = False
            self._enter_outage()
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
            self._enter_outage()
            raise UpstreamRefused(
                c.CONNECTION_FORCED, "CONNECTION_FORCED - broker handshake timed out"
            ) from None
        except UpstreamRefused as exc:
            self.stats.connect_failures += 1
            log.info("upstream refused %s@%s: %d %s", self.user, self.vhost, exc.code, exc.text)
            if exc.code == c.CONNECTION_FORCED:  # dropped in the handshake: the network or a
                self._enter_outage()  # broker shutting down, not the credentials
            else:
                self.registry.upstream_reachable = True
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
        self._waiters += 1
        self._ensure_recovery()
        try:
            await asyncio.wait_for(self._upstream_back.wait(), max(remaining, 0.0))
        except TimeoutError:
            raise UpstreamRefused(
                c.CONNECTION_FORCED,
                f"CONNECTION_FORCED - broker unreachable for {self.settings.outbox_hold:g}s",
            ) from None
        finally:
            self._waiters -= 1

    def release(self, lease: Lease, why: str) -> None:
        """The client is done with this lease: park, settle or close the upstream channel."""
        up = lease.up
        if up is not None and up.conn.pool is not self:  # the client moved (UpdateSecret)
            up.conn.pool.release(lease, why)
            return
        if up is None:
            self._adopt_backlog(lease)
            return
        lease.unbind()
        if up.conn.closed or up.state is ChannelState.CLOSING:
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
            up.settling_since = up.conn.loop.time()  # parked since, for PARKED_IDLE
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

    # ---- the outbox --------------------------------------------------------------------------

    def _adopt_backlog(self, lease: Lease) -> None:
        """A client left a channel that never got its upstream (an outage was held): its whole
        publishes are the proxy's now, the rest of what it sent is dropped."""
        data, counted = lease.take_backlog()
        now = asyncio.get_running_loop().time()
        origin = lease.client.identity
        messages = [
            Message(method, header, body, origin, now, 0)
            for method, header, body in publishes_in(data)[0]
        ]
        if messages:
            log.debug("%d message(s) of %s wait for the broker", len(messages), origin)
            self.enqueue(messages)
        self.registry.outbox.remove(counted, 0)

    def enqueue(self, messages: list[Message]) -> None:
        """Messages to publish on a channel of this pool as soon as there is one, in order."""
        totals = self.registry.outbox
        for message in messages:
            if message.attempts >= MAX_ATTEMPTS:
                self._refused(message, 0, f"lost its channel {message.attempts} times")
                continue
            self.pending.append(message)
            totals.add(message.size, 1)
        if self.pending and not self._send_pending():
            self._ensure_recovery()

    def _send_pending(self) -> bool:
        """Publish the waiting messages on one channel; False when there is no channel yet."""
        if not self.pending:
            return True
        up = self.take_parked() or self.open_now()
        if up is None:
            return False
        conn = up.conn
        pieces: list[Buffer] = []
        replayed = 0
        totals = self.registry.outbox
        while self.pending:
            message = self.pending.popleft()
            totals.remove(message.size, 1)
            frames = message.frames(up.id, conn.frame_max)
            up.published += 1
            up.outbox.add(
                up.published, 1, tuple(frames), message.origin, message.since, message.attempts + 1
            )
            pieces.extend(frames)
            replayed += message.attempts > 0
        up.last_client = "amqproxy outbox"
        conn.send(pieces)
        self.stats.replayed += replayed
        if replayed:
            log.info("replayed %d message(s) on upstream %s channel %d", replayed, conn.name, up.id)
        self._settle_or_park(up, "outbox sent")
        return True

    def _ensure_recovery(self) -> None:
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(
                self._recover(), name=f"recover {self.user}@{self.vhost}"
            )

    async def _recover(self) -> None:
        """Reconnect while messages or clients wait for the broker, pausing between attempts."""
        delay = RETRY_FIRST
        while (self.pending or self._waiters) and not self.registry.stopped:
            if self._send_pending() and self.live_upstream() is not None:
                return
            try:
                await self.connect()
                delay = RETRY_FIRST
            except UpstreamRefused as exc:
                if exc.code != c.CONNECTION_FORCED:  # the credentials or vhost are refused:
                    self._give_up(exc)  # these messages cannot be delivered any more
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX)

    def _give_up(self, exc: UpstreamRefused) -> None:
        totals = self.registry.outbox
        while self.pending:
            message = self.pending.popleft()
            totals.remove(message.size, 1)
            self._refused(message, exc.code, exc.text)

    def upstream_lost(self, up: UpstreamChannel) -> None:
        """``up`` died with its connection: publish its unconfirmed messages again."""
        entries = up.outbox.take()
        if entries:
            self.enqueue(self._messages(unconfirmed(entries, up.confirmed, up.confirmed_ahead)))

    def channel_closed_by_broker(
        self,
        up: UpstreamChannel,
        reply_code: int,
        reply_text: str,
        failed_method: int,
        *,
        orphan: bool,
    ) -> None:
        """The broker closed ``up``: settle its outbox, and say so once in the log when the
        client that caused it has left (``orphan``).

        The broker handles a channel's frames in order and discards those after the failing
        one, so: publishes before it were processed, the failing publish is refused (logged,
        counted), those after it are published again. When the failing method cannot be
        placed among the publishes, every unconfirmed one is published again.
        """
        if orphan:
            self.stats.orphan_channel_errors += 1
        entries = up.outbox.take()
        messages = unconfirmed(entries, up.confirmed, up.confirmed_ahead) if entries else []
        refused: Message | None = None
        if not messages:
            again = messages
        elif failed_method == c.BASIC_PUBLISH:
            index = refused_index(messages, reply_text)
            refused = messages[index][1]
            again = messages[index + 1 :]
        elif up.requests:  # the oldest unanswered request failed: what came before it is done
            boundary = up.requests[0]
            again = [(tag, message) for tag, message in messages if tag > boundary]
        else:
            again = messages
        if refused is not None:
            self._refused(refused, reply_code, reply_text, after_left=orphan)
        elif orphan:
            log.warning(
                "channel error after its client left (client %s, upstream %s channel %d): %d %s",
                up.last_client or "?",
                up.conn.name,
                up.id,
                reply_code,
                reply_text,
            )
        if again:
            self.enqueue(self._messages(again))

    def nacked(self, up: UpstreamChannel, tag: int, multiple: bool) -> None:
        """The broker nacked publishes of ``up``: those the proxy answered for are refused."""
        low = up.confirmed if multiple else tag - 1
        for entry in up.outbox.entries:
            if entry.last_tag - entry.count >= tag:
                break
            for message_tag, message in entry.messages():
                if low < message_tag <= tag and message_tag not in up.confirmed_ahead:
                    self._refused(message, 0, "nacked by the broker")

    @staticmethod
    def _messages(tagged: list[tuple[int, Message]]) -> list[Message]:
        return [message for _tag, message in tagged]

    def _refused(self, message: Message, code: int, text: str, after_left: bool = True) -> None:
        self.stats.refused += 1
        log.warning(
            "message of client %s to exchange %r refused by the broker%s: %s%s",
            message.origin,
            message.exchange,
            " after the client left" if after_left else "",
            f"{code} " if code else "",
            text,
        )

    def outbox_counts(self) -> tuple[int, int, float | None]:
        """(messages, bytes, oldest acceptance time) of this pool's outbox."""
        messages = len(self.pending)
        size = sum(message.size for message in self.pending)
        size += sum(
            lease.backlog_size for client in self.clients for lease in client.leases.values()
        )
        oldest = self.pending[0].since if self.pending else None
        for conn in self.upstreams:
            for up in conn.channels.values():
                outbox = up.outbox
                if outbox:
                    messages += outbox.count
                    size += outbox.size
                    since = outbox.oldest()
                    if since is not None and (oldest is None or since < oldest):
                        oldest = since
        return messages, size, oldest

    # ---- housekeeping -----------------------------------------------------------------------

    def upstream_closed(self, conn: UpstreamConnection, lost: bool) -> None:
        """``conn`` is gone; ``lost``: it was open and we did not close it (an outage starts
        unless another connection of the pool is live)."""
        if conn in self.upstreams:
            self.upstreams.remove(conn)
        self.parked = [up for up in self.parked if up.conn is not conn]
        self.settling = {up for up in self.settling if up.conn is not conn}
        if lost:
            self._enter_outage()
        if self.pending:
            self._ensure_recovery()
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
        """Close idle upstreams, channels that never settled and channels parked too long."""
        for up in list(self.settling):
            if now - up.settling_since > SETTLE_TIMEOUT and up.conn.blocked_reason is None:
                up.mark_dirty("did not settle")
                self.settling.discard(up)
                up.conn.close_channel(up, "amqproxy: did not settle")
        while self.parked and now - self.parked[0].settling_since > PARKED_IDLE:
            up = self.parked.pop(0)
            up.conn.close_channel(up, "amqproxy: parked unused")
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
        """Nothing left to keep: no client, connection, waiting message or held outage."""
        return (
            not self.clients
            and not self.upstreams
            and self._connecting is None
            and not self.pending
            and not self._waiters
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

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pools: dict[PoolKey, Pool] = {}
        self.stats: defaultdict[tuple[str, str], PoolStats] = defaultdict(PoolStats)
        self.server_properties: dict[str, Any] | None = None
        self.upstream_reachable: bool | None = None
        self.frame_max = DEFAULT_FRAME_MAX  # the broker's, once an upstream has tuned
        self.ssl_context = settings.upstream_ssl_context()
        self.outbox = Totals(settings.outbox_max_bytes)
        self.stopped = False  # shutting down: no more reconnection attempts
        self._serial = 0

    def next_serial(self) -> int:
        self._serial += 1
        return self._serial

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

    def learn_server_properties(self, properties: dict[str, Any]) -> None:
        self.server_properties = properties

    def sweep(self, now: float) -> None:
        for pool in list(self.pools.values()):
            pool.sweep(now)
            self.maybe_drop(pool)

    def holding(self) -> int:
        """How many pools hold an outage now."""
        return sum(1 for pool in self.pools.values() if pool.holding())

    def undelivered(self) -> dict[str, int]:
        """Messages still in the outbox, per ``user@vhost``."""
        counts: dict[str, int] = {}
        for pool in self.pools.values():
            messages = pool.outbox_counts()[0]
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
