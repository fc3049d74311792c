"""One connection to the broker, I/O-free: the proxy plays an AMQP client here.

The handshake with the pool's credentials, channel id allocation, the broker-to-client half of
the hot path, and what becomes of clients, channels and unconfirmed messages when the
connection ends. Bytes come in through ``receive``; frames for the broker are queued and the
host writes them (everything clients queue during one turn of the event loop in one write).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

from pamqp import commands

from amqproxy import __version__
from amqproxy.amqp import constants as c
from amqproxy.amqp import frames, handshake, methods
from amqproxy.amqp.auth import Credentials, display
from amqproxy.amqp.frames import Buffer, FrameError
from amqproxy.channel import ChannelState, Client, Lease, UpstreamChannel
from amqproxy.config import Settings
from amqproxy.core.host import UpstreamHost, discard
from amqproxy.core.upstream_stream import BrokerStream
from amqproxy.errors import UpstreamRefused
from amqproxy.pool import Pool
from amqproxy.roles import PUBLISH
from amqproxy.stats import PoolStats

log = logging.getLogger("amqproxy.upstream")

HANDSHAKE_FRAME_MAX = 1 << 20  # generous: Connection.Start carries the broker's properties
CLIENT_CAPABILITIES = {
    "authentication_failure_close": True,
    "basic.nack": True,
    "connection.blocked": True,
    "consumer_cancel_notify": True,
    "exchange_exchange_bindings": True,
    "publisher_confirms": True,
    "per_consumer_qos": True,
}
_HEADER = struct.Struct(">BHI")
_U32 = struct.Struct(">I")
_TAG_AND_BITS = struct.Struct(">QB")


class UpstreamSession:
    """One AMQP connection to the broker, shared by the leases of one pool."""

    def __init__(
        self,
        pool: Pool | None,
        serial: int,
        settings: Settings,
        clock: Callable[[], float],
        credentials: Credentials | None = None,
        mechanism: str = "PLAIN",
    ) -> None:
        """``pool`` None: a login only (``credentials``), which stops after the broker's Tune
        until ``open(pool)`` names the vhost: the broker checks the password first, as when a
        client connects to it directly, and the vhost when the client's Open arrives."""
        self._pool = pool
        # The pool's counters (a login's own until it has its pool): the hot path adds to them.
        self.stats = pool.stats if pool is not None else PoolStats()
        self.credentials = credentials or (pool.credentials if pool else Credentials(b"", b""))
        self.serial = serial
        self.mechanism = mechanism  # a login presents the credentials as its client did
        self.settings = settings
        vhost = pool.vhost if pool else "?"
        self.name = f"amqproxy {display(self.credentials.user)}@{vhost} #{serial}"
        self.host: UpstreamHost | None = None  # set by the I/O side once connected
        # A client's frames of one read: the host's queue while connected and not closed (one
        # write per turn of the event loop for all the clients sharing it), else nowhere.
        self.send: Callable[[list[Buffer]], None] = discard
        self.peer = ""
        self.open = False  # handshake done and not closing
        self.closed = False
        self.channels: dict[int, UpstreamChannel] = {}
        self.channel_max = 0
        self.frame_max = c.DEFAULT_FRAME_MAX
        self.heartbeat = 0
        self.server_properties: dict[str, Any] = {}
        self.leased = 0  # channels with a lease: the connection is "in use"
        self._clock = clock  # the event loop's time (a test's own clock)
        now = clock()
        self.last_used = now
        self.blocked_reason: str | None = None
        self.paused = False  # our write buffer toward the broker is full
        self.waiting_clients: set[Client] = set()  # they stopped reading until we drain
        self.exclusive_owners: dict[bytes, Client] = {}  # exclusive queues declared here
        self.role = PUBLISH  # or consume: set by the pool when it joins (``roles``)
        self.handshaking = True  # until OpenOk, or until the broker refuses or drops us
        self.tuned = False  # the broker accepted the credentials (its Tune arrived)
        self.ready_error: UpstreamRefused | None = None  # why the handshake failed
        self.not_amqp: str | None = None  # what the broker's address answered, if not AMQP
        self.remote = ""  # the broker's address, "host:port"
        self.node = ""  # the node of the upstream list it went to, "host:port"
        # Told when the connection ends: (code, text, lost: it was open and we did not close it).
        self.on_closed: Callable[[int, str, bool], None] | None = None
        self.started = now
        self.last_read = now  # the broker's last bytes (heartbeats included)
        self.bytes_in = 0  # read from the broker (the heartbeat compares counts)
        self._start_seen = False
        self.on_ready: Callable[[], None] | None = None  # the host waits for the handshake
        self._tune_ok = b""  # a login waiting for its vhost: TuneOk goes with the Open
        self.stream = BrokerStream(self)
        self._next_id = 1
        self._rest = b""
        self._close_reason: tuple[int, str] | None = None

    @property
    def pool(self) -> Pool:
        """The pool this connection serves (a login has none until ``open``)."""
        assert self._pool is not None, "a login without its pool yet"
        return self._pool

    # ---- time and output ----------------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    def write(self, data: bytes) -> None:
        """A frame of our own, now, after what clients queued (order is kept)."""
        if self.host is not None:
            self.host.write(data)

    def wait_for_room(self, client: Client) -> None:
        """``client`` stopped reading because our write buffer is full: resume it later."""
        self.waiting_clients.add(client)

    def set_paused(self, paused: bool) -> None:
        """The host's write buffer toward the broker filled up (or drained): clients that
        stopped reading for it resume once it drains."""
        self.paused = paused
        if not paused:
            waiting, self.waiting_clients = self.waiting_clients, set()
            for client in waiting:
                client.resume_reading()

    # ---- lifecycle --------------------------------------------------------------------------

    def connected(self, host: UpstreamHost, peer: str) -> None:
        self.host = host
        if not self.closed:
            self.send = host.queue
        self.peer = peer
        self.write(c.PROTOCOL_HEADER)

    def close(self, text: str = "closed by amqproxy") -> None:
        """Close politely with Connection.Close; drop the socket if the broker does not answer."""
        if self.closed or self.host is None:
            return
        if not self.open:
            self.host.abort()
            return
        self.open = False
        self._close_reason = (c.REPLY_SUCCESS, text)
        self.write(frames.encode_method(0, commands.Connection.Close(c.REPLY_SUCCESS, text, 0, 0)))
        self.host.abort_after(self.settings.handshake_timeout)

    def heartbeat_missed(self) -> None:
        self._close_reason = (
            c.CONNECTION_FORCED,
            f"CONNECTION_FORCED - broker missed heartbeats ({self.heartbeat}s)",
        )
        if self.host is not None:
            self.host.abort()

    def lost(self, exc: Exception | None) -> None:
        """The socket is gone."""
        if self.closed:
            return
        if self._close_reason is not None:
            code, text = self._close_reason
        else:
            code, text = c.CONNECTION_FORCED, "CONNECTION_FORCED - upstream connection lost"
            if exc is not None:
                text += f": {exc}"
        # Only our own polite close (200) is expected; heartbeats, resets and bad frames are not.
        expected = self._close_reason is not None and self._close_reason[0] == c.REPLY_SUCCESS
        self._shutdown(code, text, expected=expected)

    def _shutdown(self, code: int, text: str, *, expected: bool, processed: bool = False) -> None:
        """Tear down: hand unconfirmed messages back to the pool, tell affected clients (or let
        their leases wait for another channel), leave the pool.

        ``processed``: the broker answered our Connection.Close, so it handled every frame sent
        before it; otherwise what it did not confirm is published again.
        """
        if self.closed:
            return
        was_open = self.open
        self.closed = True
        self.send = discard
        self.open = False
        if self.on_closed is not None:  # first: a node that died takes no replacement
            self.on_closed(code, text, was_open and not expected)
        if self.handshaking:
            self._handshake_done(UpstreamRefused(code, text))
        if self._pool is None:  # a login that never got its vhost: nothing else to undo
            if self.host is not None:
                self.host.close()
            return
        leases: dict[Client, list[Lease]] = {}
        for up in self.channels.values():
            if up.lease is not None:
                leases.setdefault(up.lease.client, []).append(up.lease)
            if processed:
                up.outbox.take()
            else:
                self.pool.delivery.upstream_lost(up)
        hold = code == c.CONNECTION_FORCED and self.settings.outbox_hold > 0
        for client, client_leases in leases.items():
            client.upstream_lost(client_leases, code, text, hold)
        self.set_paused(False)  # nobody waits for a connection that is gone
        self.channels.clear()
        self.leased = 0
        if was_open:
            level = logging.INFO if expected else logging.WARNING
            fields = {"event": "upstream.closed", "upstream": self.name, "code": code,
                      "reason": text, "pool": f"{self.pool.user}@{self.pool.vhost}"}  # fmt: skip
            log.log(level, "upstream %s closed (%s): %d %s", self.name, self.peer, code, text,
                    extra=fields)  # fmt: skip
        self.pool.upstream_closed(self, lost=was_open and not expected)
        if self.host is not None:
            self.host.close()  # (the host writes what is queued first)

    # ---- channels ---------------------------------------------------------------------------

    @property
    def free_channels(self) -> int:
        return self.pool.max_channels(self) - len(self.channels)

    def _allocate_id(self, preferred: int = 0) -> int:
        """A free channel id: ``preferred`` if possible (then frames pass without a rewrite)."""
        limit = self.pool.max_channels(self)
        if 0 < preferred <= limit and preferred not in self.channels:
            return preferred
        channel_id = self._next_id
        for _ in range(limit):
            if channel_id > limit:
                channel_id = 1
            if channel_id not in self.channels:
                break
            channel_id += 1
        else:
            raise UpstreamRefused(c.RESOURCE_ERROR, "RESOURCE_ERROR - no free upstream channel")
        self._next_id = channel_id + 1
        return channel_id

    def open_channel(self, preferred: int = 0, confirm: bool = True) -> UpstreamChannel:
        """Send Channel.Open on a free id (and Confirm.Select: the outbox relies on confirms).

        The channel is usable at once: the broker handles a channel's frames in order, and the
        proxy chose the id, so frames sent behind the Open need not wait for OpenOk.
        """
        channel_id = self._allocate_id(preferred)
        up = UpstreamChannel(self, channel_id, self.pool.registry.outbox)
        self.channels[channel_id] = up
        frame = frames.method_frame(channel_id, frames.CHANNEL_OPEN)
        if confirm:
            up.confirm_mode = True
            frame += frames.method_frame(channel_id, frames.CONFIRM_SELECT_NOWAIT)
        self.write(frame)
        return up

    def close_channel(self, up: UpstreamChannel, text: str) -> None:
        """Close an upstream channel the proxy no longer wants (CloseOk frees its id)."""
        if up.state is ChannelState.CLOSING or self.closed or up.id not in self.channels:
            return
        up.close_sent()
        self.write(frames.encode_method(up.id, commands.Channel.Close(c.REPLY_SUCCESS, text, 0, 0)))

    def delete_queue(self, name: bytes, why: str) -> None:
        """Delete a queue on a short-lived channel of its own, without waiting for replies."""
        if not self.open:
            return
        try:
            channel_id = self._allocate_id()
        except UpstreamRefused:
            log.warning("cannot delete queue %r on %s: no free channel", name, self.name)
            return
        up = UpstreamChannel(self, channel_id, self.pool.registry.outbox)
        up.close_sent()  # its CloseOk frees the id; nothing else matters
        self.channels[channel_id] = up
        delete = methods.encode(c.QUEUE_DELETE, queue=name, nowait=True)
        close = commands.Channel.Close(c.REPLY_SUCCESS, why, 0, 0)
        self.write(
            frames.method_frame(channel_id, frames.CHANNEL_OPEN)
            + frames.method_frame(channel_id, delete)
            + frames.encode_method(channel_id, close)
        )

    def forget_channel(self, up: UpstreamChannel) -> None:
        self.channels.pop(up.id, None)
        self.pool.channel_gone(up)

    def on_lease_change(self, delta: int) -> None:
        self.leased += delta
        self.last_used = self._clock()

    def clients(self) -> set[Client]:
        """Clients with a channel on this connection."""
        return {ch.lease.client for ch in self.channels.values() if ch.lease is not None}

    # ---- reading ----------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Bytes from the broker (the host hands every read here)."""
        self.bytes_in += len(data)
        self.last_read = self._clock()
        if self._rest:
            data = self._rest + data
            self._rest = b""
        try:
            if self.handshaking:
                self._handshake(data)
            else:
                self._rest = self.stream.process(data)
        except FrameError as exc:
            log.warning("upstream %s sent a bad frame: %s", self.name, exc.text)
            reason = exc.text
        except Exception:  # a bug of ours: drop this upstream, with the context in the log
            log.exception("internal error on upstream %s; closing it", self.name)
            reason = "INTERNAL_ERROR - amqproxy internal error"
        else:
            return
        self._close_reason = (c.CONNECTION_FORCED, f"CONNECTION_FORCED - {reason}")
        if self.host is not None:
            self.host.abort()

    def _handshake_done(self, error: UpstreamRefused | None) -> None:
        self.handshaking = False
        self.ready_error = error
        if self.on_ready is not None:
            self.on_ready()

    def _handshake(self, data: bytes) -> None:
        if not self._start_seen and self._not_amqp(data):
            return
        found, pos = frames.scan(data, HANDSHAKE_FRAME_MAX)
        for ftype, channel, start, end in found:
            if ftype != c.FRAME_METHOD or channel != 0:
                continue
            if frames.method_id_at(data, start) == c.CONNECTION_CLOSE:  # its text may not be
                self._refused_in_handshake(data, start, end)  # UTF-8: decoded as bytes
                return
            method = frames.decode_method(data[start:end])
            if isinstance(method, commands.Connection.Start):
                self._start_seen = True
                self.server_properties = dict(method.server_properties or {})
                mechanism, response = self.credentials.login(self.mechanism)
                self.write(
                    handshake.encode_start_ok(self._client_properties(), mechanism, response)
                )
            elif isinstance(method, commands.Connection.Tune):
                self._tune(method)
            elif isinstance(method, commands.Connection.OpenOk):
                self.open = True
                self._handshake_done(None)
                # Anything after OpenOk in the same read belongs to the open connection.
                if end + 1 < len(data):
                    self._rest = self.stream.process(data[end + 1 :])
                return
        if pos < len(data):
            self._rest = data[pos:]

    def _not_amqp(self, data: bytes) -> bool:
        """The first bytes from the broker's address are not a Connection.Start: say so, rather
        than the frame error reading them as frames would give."""
        wrong = handshake.not_amqp(data)
        if wrong is None:
            return False
        self.not_amqp = wrong
        self._close_reason = (c.CONNECTION_FORCED, f"CONNECTION_FORCED - {wrong}")
        if self.host is not None:
            self.host.abort()
        return True

    def _tune(self, tune: commands.Connection.Tune) -> None:
        self.channel_max = tune.channel_max or 65535
        self.frame_max = tune.frame_max or c.DEFAULT_FRAME_MAX
        wanted = self.settings.upstream_heartbeat
        self.heartbeat = tune.heartbeat if wanted is None else wanted
        tune_ok = commands.Connection.TuneOk(self.channel_max, self.frame_max, self.heartbeat)
        self._tune_ok = frames.encode_method(0, tune_ok)
        self.tuned = True
        if self._pool is not None:
            self.open_vhost(self._pool)
        elif self.on_ready is not None:
            self.on_ready()  # a login: the credentials are good, the vhost comes later
        if self.host is not None:
            self.host.start_heartbeat(self.heartbeat)

    def abandon(self) -> None:
        """A login whose client left before its Open: drop the socket (AMQP has no polite way
        out before Connection.Open; the broker logs the connection as closed early)."""
        if self.host is not None and not self.closed:
            self._close_reason = (c.REPLY_SUCCESS, "login abandoned: its client left")
            self.host.abort()

    def open_vhost(self, pool: Pool) -> None:
        """Finish the handshake for ``pool``'s vhost (a login waits for this after Tune)."""
        self._pool = pool
        self.stats = pool.stats
        self.name = f"amqproxy {pool.user}@{pool.vhost} #{self.serial}"
        self.write(self._tune_ok + handshake.encode_open(pool.vhost_bytes))

    def _refused_in_handshake(self, data: bytes, start: int, end: int) -> None:
        """The broker's Connection.Close before OpenOk: wrong credentials, vhost, limits."""
        self.write(frames.method_frame(0, frames.CONNECTION_CLOSE_OK))
        close = methods.decode(c.CONNECTION_CLOSE, data, start, end)
        code, text = close["reply_code"] or c.CONNECTION_FORCED, display(close["reply_text"])
        self._close_reason = (code, text)
        self._handshake_done(UpstreamRefused(code, text))
        if self.host is not None:
            self.host.close()

    def _client_properties(self) -> dict[str, Any]:
        return {
            "product": "amqproxy",
            "version": __version__,
            "platform": "Python",
            "information": "pooling AMQP proxy",
            "connection_name": self.name,
            "capabilities": dict(CLIENT_CAPABILITIES),
        }

    def on_connection_frame(self, ftype: int, data: bytes, start: int, end: int) -> None:
        if ftype != c.FRAME_METHOD:
            return  # heartbeats only prove liveness, which the host records on every read
        mid = frames.method_id_at(data, start)
        if mid == c.CONNECTION_CLOSE:
            close = methods.decode(mid, data, start, end)
            if not self.closed:
                self.write(frames.method_frame(0, frames.CONNECTION_CLOSE_OK))
            text = display(close["reply_text"])
            self._close_reason = (close["reply_code"] or c.CONNECTION_FORCED, text)
            self._shutdown(*self._close_reason, expected=False)
        elif mid == c.CONNECTION_CLOSE_OK:
            code, text = self._close_reason or (c.REPLY_SUCCESS, "closed")
            self._shutdown(code, text, expected=True, processed=True)
        elif mid in (c.CONNECTION_BLOCKED, c.CONNECTION_UNBLOCKED):
            self._blocked(mid, data, start, end)

    def _blocked(self, mid: int, data: bytes, start: int, end: int) -> None:
        """Connection.Blocked/Unblocked go to the clients on this connection that asked."""
        if mid == c.CONNECTION_BLOCKED:
            why = display(methods.decode(mid, data, start, end)["reason"])
            self.blocked_reason = why or "blocked"
            log.warning("upstream %s blocked by the broker: %s", self.name, why)
        else:
            self.blocked_reason = None
            log.info("upstream %s unblocked", self.name)
        frame = frames.encode(c.FRAME_METHOD, 0, data[start:end])
        for client in self.clients():
            if client.wants_blocked:
                client.send([frame])
