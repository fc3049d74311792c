"""The upstream side: one connection to the broker, shared by the leases of one pool.

The proxy plays an AMQP client here: handshake with the pool's credentials, channel id
allocation, heartbeats it owns, and the broker-to-client half of the hot path.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import TYPE_CHECKING, Any, cast

from pamqp import commands

from amqproxy import __version__
from amqproxy.amqp import constants as c
from amqproxy.amqp import frames, handshake, methods
from amqproxy.amqp.auth import display
from amqproxy.amqp.frames import Buffer, FrameError, add_piece, add_pieces
from amqproxy.amqp.scan import broker_run as run_scan
from amqproxy.channel import ChannelState, Lease, LeaseState, UpstreamChannel
from amqproxy.heartbeat import HeartbeatMixin

if TYPE_CHECKING:
    from amqproxy.client import ClientConnection
    from amqproxy.pool import Pool

log = logging.getLogger("amqproxy.upstream")

HANDSHAKE_FRAME_MAX = 1 << 20  # generous: Connection.Start carries the broker's properties
DEFAULT_FRAME_MAX = 131072
CLIENT_CAPABILITIES = {
    "authentication_failure_close": True,
    "basic.nack": True,
    "connection.blocked": True,
    "consumer_cancel_notify": True,
    "exchange_exchange_bindings": True,
    "publisher_confirms": True,
    "per_consumer_qos": True,
}

# Methods from the broker that the proxy must look at before (or instead of) forwarding.
_WATCHED = frozenset(
    {
        c.CHANNEL_OPEN_OK,
        c.CHANNEL_CLOSE,
        c.CHANNEL_CLOSE_OK,
        c.BASIC_ACK,
        c.BASIC_NACK,
        c.BASIC_DELIVER,
        c.BASIC_GET_OK,
    }
    | c.SYNC_REPLIES
)


_KEEP = memoryview(b"")  # _on_method's verdict "forward unchanged" (compared by identity)


_HEADER = struct.Struct(">BHI")
_U32 = struct.Struct(">I")
_TAG_AND_BITS = struct.Struct(">QB")


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: its waiter may have timed out and gone."""
    if not future.cancelled():
        future.exception()


class UpstreamRefused(Exception):
    """The broker refused or dropped the connection; ``code``/``text`` go to the client."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class UpstreamConnection(HeartbeatMixin, asyncio.Protocol):
    """One AMQP connection to the broker."""

    def __init__(self, pool: Pool, serial: int) -> None:
        self.pool = pool
        self.settings = pool.settings
        self.name = f"amqproxy {pool.user}@{pool.vhost} #{serial}"
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.ready: asyncio.Future[None] = loop.create_future()
        self.ready.add_done_callback(_retrieve)  # a failed handshake nobody waits for any more
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.open = False  # handshake done and not closing
        self.closed = False
        self.channels: dict[int, UpstreamChannel] = {}
        self.channel_max = 0
        self.frame_max = DEFAULT_FRAME_MAX
        self.heartbeat = 0
        self.leased = 0  # channels with a lease: the connection is "in use"
        self.last_used = loop.time()
        self.blocked_reason: str | None = None
        self.paused = False  # our write buffer toward the broker is full
        self.waiting_clients: set[ClientConnection] = set()  # paused until we drain
        self._next_id = 1
        self._rest = b""
        self._outbox: list[Buffer] = []  # client frames queued for the end of this loop turn
        self._close_reason: tuple[int, str] | None = None
        self._init_heartbeat()
        self._close_timer: asyncio.TimerHandle | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # TCP_NODELAY is already on: uvloop and asyncio set it on every TCP transport.
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        name = transport.get_extra_info("sockname")
        if isinstance(name, tuple):
            self.peer = f"{name[0]}:{name[1]}"
        self.transport.write(c.PROTOCOL_HEADER)

    def connection_lost(self, exc: Exception | None) -> None:
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
        self.open = False
        self._stop_heartbeat()
        if self._close_timer is not None:
            self._close_timer.cancel()
        if not self.ready.done():
            self.ready.set_exception(UpstreamRefused(code, text))
        leases: dict[ClientConnection, list[Lease]] = {}
        for up in self.channels.values():
            if up.lease is not None:
                leases.setdefault(up.lease.client, []).append(up.lease)
            if processed:
                up.outbox.take()
            else:
                self.pool.upstream_lost(up)
        hold = code == c.CONNECTION_FORCED and self.settings.outbox_hold > 0
        for client, client_leases in leases.items():
            client.upstream_lost(client_leases, code, text, hold)
        for client in self.waiting_clients:
            client.resume_reading()
        self.waiting_clients.clear()
        self.channels.clear()
        self.leased = 0
        if was_open:
            level = logging.INFO if expected else logging.WARNING
            log.log(level, "upstream %s closed (%s): %d %s", self.name, self.peer, code, text)
        self.pool.upstream_closed(self, lost=was_open and not expected)
        if self.transport is not None:
            self._flush_outbox()
            self.transport.close()

    def close(self, text: str = "closed by amqproxy") -> None:
        """Close politely with Connection.Close; abort if the broker does not answer."""
        if self.closed or self.transport is None:
            return
        if not self.open:
            self.transport.abort()
            return
        self.open = False
        self._close_reason = (c.REPLY_SUCCESS, text)
        self._write(frames.encode_method(0, commands.Connection.Close(c.REPLY_SUCCESS, text, 0, 0)))
        self._close_timer = self.loop.call_later(self.settings.handshake_timeout, self._abort_close)

    def _abort_close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # ---- writing and flow control -------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Write a frame of our own now, after what clients queued (order is kept)."""
        assert self.transport is not None
        self._flush_outbox()
        self._wrote = True
        self.transport.write(data)

    def send(self, pieces: list[Buffer]) -> None:
        """Queue the frames a client produced in one read; everything clients queue during one
        turn of the event loop goes out in one write (many clients share this connection)."""
        if self.closed or self.transport is None:
            return
        self._wrote = True
        if self._outbox:
            self._outbox.extend(pieces)
        else:
            self._outbox = pieces
            self.loop.call_soon(self._flush_outbox)

    def _flush_outbox(self) -> None:
        pieces, self._outbox = self._outbox, []
        if pieces and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(pieces))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        waiting, self.waiting_clients = self.waiting_clients, set()
        for client in waiting:
            client.resume_reading()

    # ---- heartbeats -------------------------------------------------------------------------

    def _heartbeat_missed(self) -> None:
        self._close_reason = (
            c.CONNECTION_FORCED,
            f"CONNECTION_FORCED - broker missed heartbeats ({self.heartbeat}s)",
        )
        if self.transport is not None:
            self.transport.abort()

    # ---- channels ---------------------------------------------------------------------------

    @property
    def free_channels(self) -> int:
        limit = self.pool.max_channels(self)
        return limit - len(self.channels)

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
        up.state = ChannelState.CLOSING  # its CloseOk frees the id; nothing else matters
        self.channels[channel_id] = up
        delete = methods.encode(c.QUEUE_DELETE, queue=name, nowait=True)
        self._write(
            b"".join(
                (
                    frames.method_frame(channel_id, frames.CHANNEL_OPEN),
                    frames.method_frame(channel_id, delete),
                    frames.encode_method(
                        channel_id, commands.Channel.Close(c.REPLY_SUCCESS, why, 0, 0)
                    ),
                )
            )
        )

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
        self._write(frame)
        return up

    def close_channel(self, up: UpstreamChannel, text: str) -> None:
        """Close an upstream channel the proxy no longer wants (CloseOk frees its id)."""
        if up.state is ChannelState.CLOSING or self.closed or up.id not in self.channels:
            return
        up.state = ChannelState.CLOSING
        up.lease = None
        self._write(
            frames.encode_method(up.id, commands.Channel.Close(c.REPLY_SUCCESS, text, 0, 0))
        )

    def forget_channel(self, up: UpstreamChannel) -> None:
        self.channels.pop(up.id, None)
        self.pool.channel_gone(up)

    # ---- reading ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._read_seen = True
        if self._rest:
            data = self._rest + data
            self._rest = b""
        try:
            if not self.open and not self.closed and not self.ready.done():
                self._handshake(data)
            else:
                self._forward(data)
        except FrameError as exc:
            log.warning("upstream %s sent a bad frame: %s", self.name, exc.text)
            reason = exc.text
        except Exception:  # a bug of ours: drop this upstream, with the context in the log
            log.exception("internal error on upstream %s; closing it", self.name)
            reason = "INTERNAL_ERROR - amqproxy internal error"
        else:
            return
        self._close_reason = (c.CONNECTION_FORCED, f"CONNECTION_FORCED - {reason}")
        if self.transport is not None:
            self.transport.abort()

    def _handshake(self, data: bytes) -> None:
        found, pos = frames.scan(data, HANDSHAKE_FRAME_MAX)
        for ftype, channel, start, end in found:
            if ftype != c.FRAME_METHOD or channel != 0:
                continue
            if frames.method_id_at(data, start) == c.CONNECTION_CLOSE:  # its text may not be
                self._refused_in_handshake(data, start, end)  # UTF-8: decoded as bytes
                return
            method = frames.decode_method(data[start:end])
            if isinstance(method, commands.Connection.Start):
                self.pool.registry.learn_server_properties(method.server_properties or {})
                mechanism, response = self.pool.credentials.login()
                self._write(
                    handshake.encode_start_ok(self._client_properties(), mechanism, response)
                )
            elif isinstance(method, commands.Connection.Tune):
                self.channel_max = method.channel_max or 65535
                self.frame_max = method.frame_max or DEFAULT_FRAME_MAX
                wanted = self.settings.upstream_heartbeat
                self.heartbeat = method.heartbeat if wanted is None else wanted
                self._write(
                    frames.encode_method(
                        0,
                        commands.Connection.TuneOk(
                            self.channel_max, self.frame_max, self.heartbeat
                        ),
                    )
                )
                self._write(handshake.encode_open(self.pool.vhost_bytes))
                self._start_heartbeat(self.heartbeat)
            elif isinstance(method, commands.Connection.OpenOk):
                self.open = True
                self.ready.set_result(None)
                # Anything after OpenOk in the same read belongs to the open connection.
                if end + 1 < len(data):
                    self._forward(data[end + 1 :])
                return
        if pos < len(data):
            self._rest = data[pos:]

    def _refused_in_handshake(self, data: bytes, start: int, end: int) -> None:
        """The broker's Connection.Close before OpenOk: wrong credentials, vhost, limits."""
        self._write(frames.method_frame(0, frames.CONNECTION_CLOSE_OK))
        close = methods.decode(c.CONNECTION_CLOSE, data, start, end)
        code, text = close["reply_code"] or c.CONNECTION_FORCED, display(close["reply_text"])
        self._close_reason = (code, text)
        if not self.ready.done():
            self.ready.set_exception(UpstreamRefused(code, text))
        if self.transport is not None:
            self.transport.close()

    def _client_properties(self) -> dict[str, Any]:
        return {
            "product": "amqproxy",
            "version": __version__,
            "platform": "Python",
            "information": "pooling AMQP proxy",
            "connection_name": self.name,
            "capabilities": dict(CLIENT_CAPABILITIES),
        }

    def _forward(self, data: bytes) -> None:
        """The broker-to-client hot path.

        Walks frame headers only; frames that reach a client unchanged are coalesced into runs,
        one slice of the read buffer per stretch, and each client gets one write per read.
        For a leased channel, ``run_scan`` walks the plain frames from there in one call
        (compiled when the extension is built); for a client whose channel has another number,
        or whose confirm tags are translated, it returns them copied with the client's numbers.
        """
        view = memoryview(data)
        length = len(data)
        limit = self.frame_max - c.FRAME_OVERHEAD
        channels = self.channels
        unpack = _HEADER.unpack_from
        outs: dict[ClientConnection, list[Buffer]] = {}
        run_client: ClientConnection | None = None
        run_start = run_end = 0
        lease_open = LeaseState.OPEN
        ack = c.BASIC_ACK
        watched = _WATCHED
        pos = 0
        while length - pos >= 7:
            ftype, channel_id, size = unpack(data, pos)
            if size > limit:
                raise FrameError(c.FRAME_ERROR, f"FRAME_ERROR - broker frame of {size} bytes")
            end = pos + 7 + size
            if end >= length:
                break
            if data[end] != 0xCE:
                raise FrameError(c.FRAME_ERROR, "FRAME_ERROR - bad frame end octet from broker")
            nxt = end + 1
            client: ClientConnection | None = None
            up = channels.get(channel_id) if channel_id else None
            lease = up.lease if up is not None else None
            if lease is not None and lease.state is lease_open and size <= lease.client.max_body:
                # The plain frames from here on this channel (content, Deliver with untranslated
                # tags, in-order confirms) in one call; copied with the client's numbers when its
                # channel id or confirm tags differ from the broker's, and without the confirms
                # when the client did not select them (they are the outbox's).
                assert up is not None
                client = lease.client
                own = lease.client_confirm
                stop, delivered, confirmed, moved = run_scan(
                    data,
                    pos,
                    channel_id,
                    min(limit, client.max_body),
                    not lease.tag_offset,
                    -1 if up.confirmed_ahead or not up.confirm_mode else up.confirmed,
                    lease.confirm_offset if own else 0,
                    lease.channel_id,
                    not own,
                )
                if stop > pos:
                    up.delivered += delivered
                    if confirmed >= 0:
                        up.confirmed = confirmed
                        if up.outbox:
                            up.outbox.confirmed_through(confirmed)
                    if moved is not None:
                        if run_client is not None:
                            add_piece(outs, run_client, view[run_start:run_end])
                            run_client = None
                        if moved:
                            add_piece(outs, client, moved)
                        pos = stop
                        continue
                    nxt = stop
                elif not lease.verbatim or lease.confirm_offset:
                    client = None  # to translate, one frame at a time
                elif ftype == 1:
                    mid = _U32.unpack_from(data, pos + 7)[0]
                    if mid == ack and lease.client_confirm:
                        # A confirm out of order, tags untranslated: record and pass.
                        tag, bits = _TAG_AND_BITS.unpack_from(data, pos + 11)
                        up.confirm(tag, bool(bits & 1))
                    elif mid in watched:
                        client = None  # the proxy acts on it
            if client is None:
                if run_client is not None:
                    add_piece(outs, run_client, view[run_start:run_end])
                    run_client = None
                if channel_id == 0:
                    self._on_connection_frame(ftype, data, pos + 7, end)
                elif up is not None:
                    self._frame(up, ftype, channel_id, data, view, pos, end, outs)
                pos = nxt
                continue
            if run_client is client and run_end == pos:
                run_end = nxt
            else:
                if run_client is not None:
                    add_piece(outs, run_client, view[run_start:run_end])
                run_client, run_start, run_end = client, pos, nxt
            pos = nxt
        if run_client is not None:
            add_piece(outs, run_client, view[run_start:run_end])
        if pos < length:
            self._rest = data[pos:]
        for client, pieces in outs.items():
            client.send(pieces)

    def _frame(
        self,
        up: UpstreamChannel,
        ftype: int,
        channel_id: int,
        data: bytes,
        view: memoryview,
        pos: int,
        end: int,
        outs: dict[ClientConnection, list[Buffer]],
    ) -> None:
        """One frame off the fast path: methods the proxy acts on, id rewrites, re-splits."""
        start = pos + 7
        replaced: Buffer | None = None
        if ftype == c.FRAME_METHOD:
            mid = frames.method_id_at(data, start)
            if mid in _WATCHED:
                verdict = self._on_method(up, mid, data, start, end)
                if verdict is None:
                    return
                if verdict is not _KEEP:
                    replaced = verdict
        lease = up.lease
        if lease is None or lease.state is not LeaseState.OPEN:
            return
        client = lease.client
        if replaced is not None:
            add_pieces(
                outs,
                client,
                [frames.header(ftype, lease.channel_id, len(replaced)), replaced, b"\xce"],
            )
        elif ftype == c.FRAME_BODY and end - start > client.max_body:
            add_pieces(
                outs,
                client,
                list(frames.split_body(lease.channel_id, view[start:end], client.max_body)),
            )
        elif lease.channel_id == channel_id:
            add_piece(outs, client, view[pos : end + 1])
        else:
            add_pieces(
                outs,
                client,
                [frames.header(ftype, lease.channel_id, end - start), view[start : end + 1]],
            )

    def _on_method(
        self, up: UpstreamChannel, mid: int, data: bytes, start: int, end: int
    ) -> Buffer | None:
        """Act on a watched broker method.

        Returns None to drop the frame, _KEEP to forward it unchanged, or a new payload.
        """
        lease = up.lease
        if mid in c.SYNC_REPLIES:
            up.reply_received()
        if mid == c.QUEUE_DECLARE_OK and lease is not None and lease.declares:
            if lease.declares.popleft():  # an exclusive queue: it dies with this client
                declared = methods.decode(mid, data, start, end)
                lease.client.own_exclusive_queue(declared["queue"], self)
        if mid == c.BASIC_DELIVER or mid == c.BASIC_GET_OK:
            up.delivered += 1
            if lease is not None and lease.tag_offset:
                return frames.retag(
                    data, start, end, frames.tag_position(mid, data, start), -lease.tag_offset
                )
        elif mid == c.BASIC_ACK or mid == c.BASIC_NACK:
            if up.confirm_mode:
                tag, multiple = frames.tag_and_flags(data, start)
                if mid == c.BASIC_NACK and up.outbox:
                    self.pool.nacked(up, tag, multiple)
                up.confirm(tag, multiple)
                if lease is None:
                    self.pool.maybe_settled(up)
                    return None
                if not lease.client_confirm or tag <= lease.confirm_offset:
                    return None  # confirms of publishes this client sent before Select
                if lease.confirm_offset:
                    return frames.retag(data, start, end, start + 4, -lease.confirm_offset)
        elif mid == c.CHANNEL_OPEN_OK:
            if up.state is ChannelState.OPENING:
                up.state = ChannelState.OPEN
            if lease is None:
                self.pool.maybe_settled(up)
            return None
        elif mid == c.CHANNEL_CLOSE:
            self._on_broker_channel_close(up, data, start, end)
            return None
        elif mid == c.CHANNEL_CLOSE_OK:
            up.outbox.take()  # the broker handled everything sent before the Close
            self.forget_channel(up)
            if lease is not None and lease.state in (LeaseState.CLOSING, LeaseState.CROSSED):
                lease.client.channel_closed_upstream(lease)
            return None
        if lease is None:
            self.pool.maybe_settled(up)
            return None
        return _KEEP

    def _on_broker_channel_close(
        self, up: UpstreamChannel, data: bytes, start: int, end: int
    ) -> None:
        """The broker closed a channel: answer it, free the id (once our own Close, if one
        crossed it, has its CloseOk too), settle its outbox, tell the lease's client."""
        self._write(frames.method_frame(up.id, frames.CHANNEL_CLOSE_OK))
        close = methods.decode(c.CHANNEL_CLOSE, data, start, end)  # the text: bytes, as sent
        lease = up.lease
        crossed = up.state is ChannelState.CLOSING  # our Close is on its way: its CloseOk
        if not crossed:  # will follow, and the id stays taken until then
            self.forget_channel(up)
        failed = c.method_id(close["class_id"], close["method_id"])
        orphan = lease is None and not crossed
        code, text = close["reply_code"], display(close["reply_text"])
        self.pool.channel_closed_by_broker(up, code, text, failed, orphan=orphan)
        if lease is not None:
            lease.client.channel_closed_by_broker(lease, data[start:end])

    def _on_connection_frame(self, ftype: int, data: bytes, start: int, end: int) -> None:
        if ftype != c.FRAME_METHOD:
            return  # heartbeats only prove liveness, which _read_seen already recorded
        mid = frames.method_id_at(data, start)
        if mid == c.CONNECTION_CLOSE:
            close = methods.decode(mid, data, start, end)
            if self.transport is not None and not self.closed:
                self._write(frames.method_frame(0, frames.CONNECTION_CLOSE_OK))
            text = display(close["reply_text"])
            self._close_reason = (close["reply_code"] or c.CONNECTION_FORCED, text)
            self._shutdown(*self._close_reason, expected=False)
        elif mid == c.CONNECTION_CLOSE_OK:
            code, text = self._close_reason or (c.REPLY_SUCCESS, "closed")
            self._shutdown(code, text, expected=True, processed=True)
        elif mid in (c.CONNECTION_BLOCKED, c.CONNECTION_UNBLOCKED):
            payload = data[start:end]
            if mid == c.CONNECTION_BLOCKED:
                why = display(methods.decode(mid, data, start, end)["reason"])
                self.blocked_reason = why or "blocked"
                log.warning("upstream %s blocked by the broker: %s", self.name, why)
            else:
                self.blocked_reason = None
                log.info("upstream %s unblocked", self.name)
            frame = frames.encode(c.FRAME_METHOD, 0, payload)
            for client in self.clients():
                if client.wants_blocked:
                    client.send([frame])
        elif mid == c.CONNECTION_UPDATE_SECRET_OK:
            pass

    def clients(self) -> set[ClientConnection]:
        """Clients with a channel on this connection."""
        return {ch.lease.client for ch in self.channels.values() if ch.lease is not None}

    def on_lease_change(self, delta: int) -> None:
        self.leased += delta
        self.last_used = self.loop.time()
