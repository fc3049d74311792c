"""The asyncio side of a client connection: its socket, timers, flow control and round trips.

Everything the connection decides is ``core.client.ClientSession``'s; this adapter feeds it
bytes and socket events, and carries out what it asks (``core.host.ClientHost``): writes,
closes, pausing reads, and the upstream round trips, run as tasks that report back to it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Coroutine
from typing import Any, cast

from amqproxy.amqp import constants as c
from amqproxy.amqp.auth import Credentials
from amqproxy.amqp.frames import Buffer
from amqproxy.channel import Connection, Lease
from amqproxy.config import Settings
from amqproxy.core.client import ClientSession
from amqproxy.errors import NoChannelFree, UpstreamRefused, retrieve
from amqproxy.io.heartbeat import Heartbeat
from amqproxy.nodes import Nodes
from amqproxy.pool import Login, Pool, PoolRegistry
from amqproxy.stats import PoolStats
from amqproxy.tls import subject

log = logging.getLogger("amqproxy.client")

_ids = itertools.count(1)  # client ids of the admin API: one per connection, never reused


class FlowControl:
    """Reading from one socket, paused while any reason to hold it stands (the upstream is
    full, the outbox is full, a channel's backlog is too long)."""

    __slots__ = ("held", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.held: set[str] = set()

    def hold(self, reason: str) -> None:
        if not self.held:
            self.transport.pause_reading()
        self.held.add(reason)

    def release(self, reason: str) -> None:
        if reason not in self.held:
            return
        self.held.discard(reason)
        if not self.held and not self.transport.is_closing():
            self.transport.resume_reading()


class ClientProtocol(asyncio.Protocol):
    """One client socket, driving one ClientSession."""

    def __init__(
        self,
        settings: Settings,
        registry: PoolRegistry,
        broker: Nodes,
        clients: set[Any],
        refusal: str = "",
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.clients = clients  # the server's: every open client socket
        self.loop = asyncio.get_running_loop()
        self.id = next(_ids)
        self.connected_at = time.time()  # wall clock, for operators
        self.bytes_out = 0  # counted per write (``/api/clients``; pools: PoolStats)
        self._credited = (0, 0)  # what the pool's totals have of them (``credit_traffic``)
        self.peer = "?"  # "address:port", and " [subject]" of a TLS client's certificate
        self.certificate = ""  # that subject, e.g. "CN=app1,O=Example"
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self.session = ClientSession(self, settings, registry, broker)
        self.session.refusal = refusal  # over --max-clients: refused at Connection.StartOk
        self.heartbeat: Heartbeat | None = None  # once the client asks for heartbeats
        # Reads go straight to the session (one call less per read: the transport looks the
        # method up on this object); ``bytes_in`` is the session's count.
        self.data_received = self.session.receive  # type: ignore[method-assign]
        self._write_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._round_trips = 0  # tasks running for this client (``_spawn``)
        self._gone = False  # the socket is closed

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # TCP_NODELAY is already on: uvloop and asyncio set it on every TCP transport.
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        if self.settings.tls_client_ca:  # who the certificate says it is, in every line
            self.certificate = subject(transport.get_extra_info("peercert"))
            if self.certificate:
                self.peer += f" [{self.certificate}]"
        if not self.session.refusal:  # a refused socket is not one of the clients served
            self.clients.add(self)
        timeout = self.settings.handshake_timeout
        self._timer = self.loop.call_later(timeout, self._handshake_expired)

    def _handshake_expired(self) -> None:
        if not self.session.handshake_expired():
            timeout = self.settings.handshake_timeout
            self._timer = self.loop.call_later(timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        self.session.receive(data)  # (replaced in __init__ by the session's own method)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.clients.discard(self)
        self.session.lost(exc)
        self.transport = None
        self.flow = None
        self._gone = True
        if not self._round_trips:
            self._let_go()

    def _let_go(self) -> None:
        """The socket is closed and no round trip is running: nothing reads or calls this
        client's parts again. The references between them go, so that reference counting
        frees them at once rather than the cycle collector, thousands of clients later."""
        self.session.let_go()
        self.heartbeat = None  # it holds this protocol's and the session's methods
        del self.data_received  # the session's method
        del self.session

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False

    # ---- core.host.ClientHost: the socket -----------------------------------------------------

    def now(self) -> float:
        return self.loop.time()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self.bytes_out += len(data)
            transport.write(data)

    def deliver(self, pieces: list[Buffer]) -> None:
        transport = self.transport
        if transport is None:
            return
        data = b"".join(pieces)
        self.bytes_out += len(data)
        transport.write(data)
        if (
            self._write_paused
            and transport.get_write_buffer_size() > self.settings.max_client_buffer
        ):
            self.session.close_reason = "client too slow: outbound buffer limit reached"
            log.warning(
                "client %s reads too slowly (%d bytes buffered); disconnecting",
                self.session.describe(),
                transport.get_write_buffer_size(),
            )
            transport.abort()

    @property
    def bytes_in(self) -> int:
        """Bytes read from the client (``/api/clients``)."""
        return self.session.bytes_in  # (asked only while the client is one of the server's)

    def credit_traffic(self, stats: PoolStats) -> None:
        """Add what was read and written since the last call to ``stats``: a pool's byte
        totals are brought up to date when they are read and when a client leaves the pool,
        not on every read and write."""
        credited_in, credited_out = self._credited
        stats.bytes_in += self.bytes_in - credited_in
        stats.bytes_out += self.bytes_out - credited_out
        self._credited = (self.bytes_in, self.bytes_out)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close_after(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(seconds, self.abort)

    def hold(self, reason: str) -> None:
        if self.flow is None and self.transport is not None:  # made when first needed
            self.flow = FlowControl(self.transport)
        if self.flow is not None:
            self.flow.hold(reason)

    def release(self, reason: str) -> None:
        if self.flow is not None:
            self.flow.release(reason)

    def start_heartbeat(self, seconds: int) -> None:
        if seconds > 0 and self.heartbeat is None:
            self.heartbeat = Heartbeat(
                self.loop, self._send_heartbeat, self.session.heartbeat_missed, self._traffic
            )
            self.heartbeat.start(seconds)

    def _traffic(self) -> tuple[int, int]:
        return self.bytes_in, self.bytes_out

    def _send_heartbeat(self, frame: bytes) -> None:
        self.write(frame)

    # ---- core.host.ClientHost: round trips ----------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run control-path work (an upstream round trip) beside the hot path."""
        task = self.loop.create_task(work, name=getattr(work, "__qualname__", "task"))
        task.add_done_callback(self._task_done)
        self._round_trips += 1

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._round_trips -= 1
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            self.session.internal_error(f"in {task.get_name()}", exc)
        if self._gone and not self._round_trips:
            self._let_go()

    def learn_broker(self) -> None:
        self._spawn(self._learn_broker())

    async def _learn_broker(self) -> None:
        """First contact: the broker's properties are not known yet (bounded by timeouts)."""
        await self.broker.properties()
        self.session.send_start(self.broker.start_frame() or self.broker.fallback_start_frame())

    def check_credentials(self, credentials: Credentials, mechanism: str) -> None:
        self._spawn(self._check_credentials(credentials, mechanism))

    async def _check_credentials(self, credentials: Credentials, mechanism: str) -> None:
        """The broker checks the password: at most once at a time per credentials (a client
        whose bytes are being checked already takes that answer; its Open then finds the
        pool that the first client's login opens, rather than one login per cold client)."""
        pending = self.session.registry.checks.get((credentials, mechanism))
        try:
            if pending is not None and await asyncio.shield(pending):
                login = None  # accepted, on the first client's login
            else:
                login = await self._login(credentials, mechanism)
        except UpstreamRefused as exc:
            if exc.reachable and exc.code != c.CONNECTION_FORCED:
                self.session.credentials_refused(exc.code, exc.text)
            else:  # the broker cannot say now: Connection.Open will get the answer
                self.session.credentials_checked(None, exc.text)
            return
        self.session.registry.upstream_reachable = True
        self.session.credentials_checked(login)

    async def _login(self, credentials: Credentials, mechanism: str) -> Login:
        """This client's own StartOk upstream, its answer shared with those that ask
        meanwhile (``PoolRegistry.checks``)."""
        checks = self.session.registry.checks
        key = (credentials, mechanism)
        checks[key] = pending = self.loop.create_future()
        pending.add_done_callback(retrieve)
        try:
            login = await self.broker.login(credentials, mechanism)
            pending.set_result(True)
            return login
        except UpstreamRefused as exc:
            pending.set_exception(exc)
            raise
        finally:
            if checks.get(key) is pending:
                del checks[key]
            if not pending.done():
                pending.set_result(False)  # no answer (cancelled): each asks on its own

    def authenticate(self, pool: Pool, login: Login | None) -> None:
        self._spawn(self._authenticate(pool, login))

    async def _authenticate(self, pool: Pool, login: Login | None) -> None:
        try:
            await pool.authenticate(login)
        except UpstreamRefused as exc:
            self.session.refused(pool, exc.code, exc.text)
            return
        self.session.admitted(pool)

    def open_channel(
        self,
        pool: Pool,
        lease: Lease,
        confirm: bool,
        consume: bool = False,
        near: Connection | None = None,
    ) -> None:
        self._spawn(self._open_channel(pool, lease, confirm, consume, near))

    async def _open_channel(
        self, pool: Pool, lease: Lease, confirm: bool, consume: bool, near: Connection | None
    ) -> None:
        try:
            up = await pool.roles.channel(lease.channel_id, near) if consume else None
            up = up or await pool.new_channel(lease.channel_id, confirm)
        except NoChannelFree as exc:
            self.session.channel_refused(lease, exc.code, exc.text)
            return
        except UpstreamRefused as exc:
            self.session.channel_failed(lease, exc.code, exc.text)
            return
        except TimeoutError:
            text = "CONNECTION_FORCED - upstream channel open timed out"
            self.session.channel_failed(lease, c.CONNECTION_FORCED, text)
            return
        self.session.channel_ready(lease, up)

    def update_secret(self, pool: Pool, credentials: Credentials, reason: str) -> None:
        self._spawn(self._update_secret(pool, credentials, reason))

    async def _update_secret(self, pool: Pool, credentials: Credentials, reason: str) -> None:
        """Connection.UpdateSecret (OAuth 2 refresh): prove the new secret upstream."""
        try:
            await pool.authenticate()
        except UpstreamRefused as exc:
            self.session.secret_refused(pool, exc.code, exc.text)
            return
        self.session.secret_updated(pool, credentials, reason)
