"""One client connection, I/O-free: the proxy plays the broker here.

``ClientSession`` owns the connection's state (docs/ARCHITECTURE.md, "The client session"):
bytes come in through ``receive``, what to do goes out through its ``ClientHost`` (write,
close, hold reading, start a round trip upstream), and the round trips report back through
the methods under "Outcomes". Its parts, each in its own module: the handshake
(``core.client_handshake``), the channel table and the methods the proxy acts on
(``core.client_channels``), and the hot path (``core.client_stream``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from pamqp import commands

from amqproxy.amqp import auth, frames, methods
from amqproxy.amqp import constants as c
from amqproxy.amqp.frames import Buffer, FrameError
from amqproxy.config import Settings
from amqproxy.core.client_channels import ChannelTable
from amqproxy.core.client_handshake import Handshake, Step
from amqproxy.core.client_stream import ClientStream
from amqproxy.core.host import BrokerFacts, ClientHost, discard
from amqproxy.core.session import State
from amqproxy.logsetup import hot_info

if TYPE_CHECKING:
    from amqproxy.channel import Connection, Lease, UpstreamChannel
    from amqproxy.pool import Login, Pool, PoolRegistry

log = logging.getLogger("amqproxy.client")

CLOSE_OK_TIMEOUT = 5.0  # how long a client may take to answer our Connection.Close
PAUSED = "CONNECTION_FORCED - amqproxy is paused and admits no new clients; retry later"


class ClientSession:
    """One client of the proxy."""

    def __init__(
        self, host: ClientHost, settings: Settings, registry: PoolRegistry, broker: BrokerFacts
    ) -> None:
        self.host = host
        self.settings = settings
        self.registry = registry
        self.broker = broker
        self.state = State.HANDSHAKE
        # Where frames from the broker for this client go (``send(pieces)``, one write): its
        # socket while the connection is open, nowhere before or after (``_enter``).
        self.send: Callable[[list[Buffer]], None] = discard
        self.handshake = Handshake(self)
        self.channels = ChannelTable(self)
        self.stream = ClientStream(self, self.channels)
        self.pool: Pool | None = None
        self.user = ""  # for logs: the credentials stay bytes
        self.vhost = ""
        self.credentials = auth.Credentials(b"", b"")
        self.vhost_bytes = b""
        self.connection_name = ""
        self.wants_blocked = False
        self.frame_max = c.FRAME_MIN_SIZE  # until Tune: what RabbitMQ accepts before it
        self.max_body = c.FRAME_MIN_SIZE - c.FRAME_OVERHEAD
        self.channel_max = settings.channel_max
        self.heartbeat = 0
        self.identity = "?"  # describe() once admitted: outbox messages carry it for logs
        self.close_reason = ""
        # Set by the host when the proxy serves --max-clients already: the handshake then ends
        # at StartOk with Connection.Close 320 and this text.
        self.refusal = ""
        self._rest = b""
        self.bytes_in = 0  # read from the client, for the host's counts
        self._sent_blocked = False  # we told the client Connection.Blocked (outbox full)
        self.login: Login | None = None  # the broker accepted the password; the vhost is next
        self.trusted: Pool | None = None  # a pool of these credentials trusted at StartOk
        self.unreachable = ""  # why the broker could not check the password at StartOk

    @property
    def leases(self) -> dict[int, Lease]:
        return self.channels.leases

    @property
    def is_open(self) -> bool:
        return self.state is State.OPEN

    def log_fields(self, event: str, **more: object) -> dict[str, object]:
        """What a JSON log line says about this client (``logsetup.FIELDS``)."""
        return {
            "event": event,
            "client": self.host.peer,
            "user": self.user,
            "vhost": self.vhost,
            "connection_name": self.connection_name,
            "pool": f"{self.user}@{self.vhost}" if self.vhost else "",
            **more,
        }

    def credit_traffic(self) -> None:
        """The pool's byte totals catch up with this client's (``io.client``)."""
        if self.pool is not None:
            self.host.credit_traffic(self.pool.stats)

    def describe(self) -> str:
        name = f" ({self.connection_name})" if self.connection_name else ""
        return f"{self.user or '?'}@{self.vhost or '?'} from {self.host.peer}{name}"

    # ---- bytes in ---------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Bytes from the client (the host hands every read here)."""
        self.bytes_in += len(data)
        if self._rest:
            data = self._rest + data
            self._rest = b""
        try:
            state = self.state
            if state is State.OPEN:
                self._rest = self.stream.process(data)
                return
            if state is State.HANDSHAKE:
                data = self.handshake.receive(data)
                state = self.state
                if state is not State.OPEN:
                    if state is State.HANDSHAKE or state is State.AUTHENTICATING:
                        self._rest = data  # a partial frame, or what follows Open
                    return
                if not data:
                    return
            if state is State.OPEN:
                self._rest = self.stream.process(data)
            elif state is State.CLOSING:
                self._rest = self._while_closing(data)
            elif state is State.AUTHENTICATING:
                self._rest = data  # read after OpenOk
        except Exception as exc:  # a bug of ours: this client goes, the others stay
            self.internal_error("handling data", exc)

    def internal_error(self, doing: str, exc: BaseException) -> None:
        log.error(
            "internal error %s for client %s; closing it", doing, self.describe(), exc_info=exc
        )
        self.close_with(c.INTERNAL_ERROR, "INTERNAL_ERROR - amqproxy internal error")
        self.host.abort()

    def on_connection_frame(self, ftype: int, data: bytes, start: int, end: int) -> None:
        """A frame on channel 0 of an open connection."""
        if ftype == c.FRAME_HEARTBEAT:
            return
        if ftype != c.FRAME_METHOD:
            raise FrameError(c.UNEXPECTED_FRAME, "UNEXPECTED_FRAME - content frame on channel 0")
        mid = frames.method_id_at(data, start)
        if mid == c.CONNECTION_CLOSE:
            self.host.write(frames.method_frame(0, frames.CONNECTION_CLOSE_OK))
            self.close_reason = "closed by client"
            self._enter(State.CLOSED)
            self.channels.release_all("client closed the connection")
            self.host.close()
        elif mid == c.CONNECTION_CLOSE_OK:
            raise FrameError(c.COMMAND_INVALID, "COMMAND_INVALID - unexpected connection.close-ok")
        elif mid == c.CONNECTION_UPDATE_SECRET:
            args = methods.decode(mid, data, start, end)
            credentials = self.credentials._replace(password=args["new_secret"])
            pool = self.registry.pool(credentials, self.vhost_bytes)
            self.host.update_secret(pool, credentials, auth.display(args["reason"]))
        else:
            raise FrameError(
                c.COMMAND_INVALID,
                f"COMMAND_INVALID - unexpected method {mid >> 16}.{mid & 0xFFFF} on channel 0",
            )

    def _while_closing(self, data: bytes) -> bytes:
        """After our Connection.Close only CloseOk (or the client's own Close) matters."""
        try:
            found, pos = frames.scan(data, max(self.frame_max, c.FRAME_MIN_SIZE))
        except FrameError:
            self.host.abort()
            return b""
        for ftype, channel_id, start, _end in found:
            if ftype != c.FRAME_METHOD or channel_id != 0:
                continue
            mid = frames.method_id_at(data, start)
            if mid == c.CONNECTION_CLOSE:
                self.host.write(frames.method_frame(0, frames.CONNECTION_CLOSE_OK))
            if mid in (c.CONNECTION_CLOSE_OK, c.CONNECTION_CLOSE):
                self.host.close()
                return b""
        return data[pos:]

    # ---- bytes out --------------------------------------------------------------------------

    def _enter(self, state: State) -> None:
        """Every change of state: broker frames reach the socket only while it is open."""
        self.state = state
        self.send = self.host.deliver if state is State.OPEN else discard

    def resume_reading(self) -> None:
        """The upstream this client writes to has room again."""
        self.host.release("upstream")

    def hold_for_outbox(self) -> None:
        """The outbox is full and this client adds to it: stop reading it (and tell it, if it
        understands Connection.Blocked) until the broker has taken enough."""
        self.host.hold("outbox")
        self.registry.outbox.waiters.add(self)
        if self.wants_blocked and not self._sent_blocked:
            self._sent_blocked = True
            blocked = commands.Connection.Blocked("amqproxy outbox full")
            self.host.write(frames.encode_method(0, blocked))

    def outbox_ready(self) -> None:
        if self._sent_blocked:
            self._sent_blocked = False
            self.host.write(frames.method_frame(0, frames.CONNECTION_UNBLOCKED))
        self.host.release("outbox")

    # ---- the end ------------------------------------------------------------------------------

    def close_with(
        self, code: int, text: str, class_id: int = 0, method_id: int = 0, quiet: bool = False
    ) -> None:
        """Send Connection.Close and give up every lease; the client answers with CloseOk.
        ``quiet``: logged at DEBUG (the caller reports these in bulk)."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        before_open = self.state is not State.OPEN
        self._enter(State.CLOSING)
        self.close_reason = f"closed by amqproxy: {code} {text}"
        self.channels.release_all("connection closed")
        level = logging.INFO if code in (c.REPLY_SUCCESS, c.CONNECTION_FORCED) else logging.WARNING
        if before_open and code in (c.ACCESS_REFUSED, c.NOT_ALLOWED):
            level = logging.WARNING
        if quiet:
            level = logging.DEBUG
        fields = self.log_fields("client.closed", code=code, reason=text)
        log.log(level, "closing client %s: %d %s", self.describe(), code, text, extra=fields)
        close = commands.Connection.Close(code, frames.reply_text(text), class_id, method_id)
        self.host.write(frames.encode_method(0, close))
        self.host.close_after(CLOSE_OK_TIMEOUT)

    def hang_up(self) -> None:
        """Close the socket without a Connection.Close (before Tune, or a bad header)."""
        self._enter(State.CLOSED)
        self.host.close()

    def heartbeat_missed(self) -> None:
        self.close_reason = f"missed heartbeats ({self.heartbeat}s)"
        fields = self.log_fields("client.heartbeat_missed", reason=self.close_reason)
        log.warning("client %s missed heartbeats; closing", self.describe(), extra=fields)
        self.host.abort()

    def handshake_expired(self) -> bool:
        """--handshake-timeout since the client connected: drop it if its handshake is not
        done. False: not now, the proxy is waiting for the broker (which has timeouts of its
        own); ask again after another timeout."""
        if self.state is not State.HANDSHAKE:
            return True
        step = self.handshake.state
        if step is Step.LEARNING or step is Step.CHECKING:
            return False
        log.warning("client %s: handshake timed out in state %s", self.host.peer, step.value)
        self.host.abort()
        return True

    def lost(self, exc: Exception | None) -> None:
        """The socket is gone."""
        was_open = self.pool is not None
        self._enter(State.CLOSED)
        if self.login is not None:
            self.login.abandon()
            self.login = None
        self.channels.release_all("client left")
        self.registry.outbox.waiters.discard(self)
        if self.pool is not None:
            self.credit_traffic()
            self.pool.client_gone(self)
        if was_open:
            reason = self.close_reason or (f"connection lost: {exc}" if exc else "connection lost")
            hot_info(
                log,
                f"client {self.identity} disconnected: {reason}",
                lambda: self.log_fields("client.disconnected", reason=reason),
            )

    def let_go(self) -> None:
        """After ``lost``, once no round trip of the host is running: the session's parts
        (which point back at it) are dropped, so that reference counting frees them. Only
        the host's side may still be called (``resume_reading``)."""
        del self.handshake, self.channels, self.stream

    # ---- outcomes of the host's round trips ------------------------------------------------

    def send_start(self, start: bytes) -> None:
        """The broker's properties are known (or cannot be): Connection.Start goes out, and
        what the client sent meanwhile is read."""
        if self.state is not State.HANDSHAKE or self.handshake.state is not Step.LEARNING:
            return
        self.handshake.start(start)
        rest, self._rest = self._rest, b""
        if rest:
            self.receive(rest)

    def credentials_checked(self, login: Login | None, unreachable: str = "") -> None:
        """The broker accepted the credentials on ``login``, or could not be reached
        (``unreachable``: why; Connection.Open says so then, unless an outage is held for
        these credentials): Tune goes out."""
        if self.state is not State.HANDSHAKE or self.handshake.state is not Step.CHECKING:
            if login is not None:
                login.abandon()
            return
        self.login = login
        self.unreachable = unreachable
        self.handshake.tune()
        rest, self._rest = self._rest, b""
        if rest:
            self.receive(rest)

    def credentials_refused(self, code: int, text: str) -> None:
        if self.state is State.HANDSHAKE and self.handshake.state is Step.CHECKING:
            self.handshake.refused(code, text)

    def opened(self, vhost: bytes) -> None:
        """Connection.Open: the vhost is proven upstream before OpenOk."""
        self.vhost_bytes = vhost
        self.vhost = auth.display(vhost)
        self._enter(State.AUTHENTICATING)
        if self.registry.paused:  # the admin API's pause: present clients stay, new ones wait
            self.close_with(c.CONNECTION_FORCED, PAUSED, 10, 40)
            return
        pool = self.registry.pool(self.credentials, vhost)
        login, self.login = self.login, None
        trusted, self.trusted = self.trusted, None
        if login is not None:
            self.host.authenticate(pool, login)  # its Open names the vhost
        elif pool is trusted or pool.trusted():
            self.admitted(pool)  # proven recently (at StartOk, or for another vhost then)
        elif self.unreachable:  # tried at StartOk already: no second wait for the timeout
            self.refused(pool, c.CONNECTION_FORCED, self.unreachable)
        else:
            self.host.authenticate(pool, None)

    def admitted(self, pool: Pool) -> None:
        if self.state is not State.AUTHENTICATING:
            self.registry.maybe_drop(pool)
            return
        self.identity = self.describe()
        self.pool = pool
        pool.client_added(self)
        self._enter(State.OPEN)
        self.host.write(frames.method_frame(0, frames.CONNECTION_OPEN_OK))
        hot_info(
            log, f"client {self.identity} connected", lambda: self.log_fields("client.connected")
        )
        if self._rest:
            data, self._rest = self._rest, b""
            self.receive(data)

    def refused(self, pool: Pool, code: int, text: str) -> None:
        """The broker refused the credentials or vhost (or could not be reached)."""
        self.registry.maybe_drop(pool)
        if self.state is State.AUTHENTICATING:
            self.close_with(code, text, 10, 40)

    def secret_updated(self, pool: Pool, credentials: auth.Credentials, reason: str) -> None:
        """Connection.UpdateSecret proven: later channels use a pool with the new secret;
        channels already open stay where they are."""
        old = self.pool
        if self.state is not State.OPEN or old is None:
            self.registry.maybe_drop(pool)
            return
        self.credit_traffic()  # what it did so far counts for the pool it leaves
        self.credentials = credentials
        self.pool = pool
        pool.client_added(self)
        if old is not pool:
            old.client_gone(self)
        self.host.write(frames.method_frame(0, frames.CONNECTION_UPDATE_SECRET_OK))
        log.info("client %s updated its secret (%s)", self.describe(), reason or "no reason given")

    def secret_refused(self, pool: Pool, code: int, text: str) -> None:
        self.registry.maybe_drop(pool)
        self.close_with(code, text, 10, 70)

    def channel_ready(self, lease: Lease, up: UpstreamChannel) -> None:
        backlog, counted = self.channels.ready(lease, up)
        if backlog:  # whole frames, read before what the session may keep of a partial one
            self.stream.process(backlog)
        self.registry.outbox.remove(counted, 0)
        self.host.release("backlog")

    def channel_failed(self, lease: Lease, code: int, text: str) -> None:
        if self.leases.get(lease.channel_id) is lease:
            self.close_with(code, text)

    def channel_refused(self, lease: Lease, code: int, text: str) -> None:
        """No upstream channel within ``--pool-wait-timeout``: an error for that channel only."""
        if self.state is State.OPEN and self.leases.get(lease.channel_id) is lease:
            self.channels.open_refused(lease, code, text)
            self.host.release("backlog")

    # ---- what upstream connections report (``channel.Client``) ------------------------------

    def upstream_lost(self, leases: list[Lease], code: int, text: str, hold: bool) -> None:
        self.channels.upstream_lost(leases, code, text, hold)

    def channel_closed_by_broker(self, lease: Lease, close_payload: bytes) -> None:
        self.channels.closed_by_broker(lease, close_payload)

    def channel_closed_upstream(self, lease: Lease) -> None:
        self.channels.closed_upstream(lease)

    def own_exclusive_queue(self, name: bytes, conn: Connection) -> None:
        self.channels.own_exclusive_queue(name, conn)
