"""The downstream side: one client connection, to which the proxy plays the broker.

Handshake as a broker (authentication happens upstream before OpenOk), the client's channel
table of leases, the client-to-broker half of the hot path, and the client's heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Coroutine
from enum import Enum
from typing import TYPE_CHECKING, Any, cast

from pamqp import commands

from amqproxy.amqp import auth, frames, handshake, methods
from amqproxy.amqp import constants as c
from amqproxy.amqp.frames import Buffer, FrameError, add_piece, add_pieces
from amqproxy.amqp.methods import body_size
from amqproxy.amqp.scan import client_run as run_scan
from amqproxy.channel import ChannelState, Lease, LeaseState
from amqproxy.heartbeat import HeartbeatMixin
from amqproxy.logsetup import hot_info
from amqproxy.outbox import publishes_in
from amqproxy.upstream import UpstreamRefused

if TYPE_CHECKING:
    from amqproxy.channel import UpstreamChannel
    from amqproxy.pool import Pool
    from amqproxy.server import Proxy
    from amqproxy.upstream import UpstreamConnection

log = logging.getLogger("amqproxy.client")

HANDSHAKE_FRAME_MAX = c.FRAME_MIN_SIZE  # until Tune: what RabbitMQ accepts before it
CLOSE_OK_TIMEOUT = 5.0  # how long a client may take to answer our Connection.Close
MAX_BACKLOG = 4 * 1024 * 1024  # frames a client sent on a channel still opening upstream

# Methods from the client that the proxy must act on; the rest is forwarded untouched.
_WATCHED = frozenset(
    {
        c.CHANNEL_OPEN,
        c.CHANNEL_CLOSE,
        c.CHANNEL_CLOSE_OK,
        c.CHANNEL_FLOW,
        c.EXCHANGE_DECLARE,
        c.EXCHANGE_DELETE,
        c.EXCHANGE_BIND,
        c.EXCHANGE_UNBIND,
        c.QUEUE_DECLARE,
        c.QUEUE_BIND,
        c.QUEUE_PURGE,
        c.QUEUE_DELETE,
        c.QUEUE_UNBIND,
        c.BASIC_QOS,
        c.BASIC_CONSUME,
        c.BASIC_CANCEL,
        c.BASIC_GET,
        c.BASIC_ACK,
        c.BASIC_NACK,
        c.BASIC_REJECT,
        c.BASIC_RECOVER,
        c.BASIC_RECOVER_ASYNC,
        c.CONFIRM_SELECT,
        c.TX_SELECT,
        c.TX_COMMIT,
        c.TX_ROLLBACK,
    }
)
# Synchronous methods with a ``nowait`` flag: a reply is pending unless it is set.
_NOWAIT_METHODS = frozenset(
    {
        c.EXCHANGE_DECLARE,
        c.EXCHANGE_DELETE,
        c.EXCHANGE_BIND,
        c.EXCHANGE_UNBIND,
        c.QUEUE_DECLARE,
        c.QUEUE_BIND,
        c.QUEUE_PURGE,
        c.QUEUE_DELETE,
        c.BASIC_CONSUME,
        c.BASIC_CANCEL,
    }
)
# Synchronous methods that always get a reply.
_ALWAYS_REPLIED = frozenset(
    {
        c.QUEUE_UNBIND,
        c.BASIC_QOS,
        c.BASIC_GET,
        c.BASIC_RECOVER,
        c.TX_SELECT,
        c.TX_COMMIT,
        c.TX_ROLLBACK,
        c.CHANNEL_FLOW,
    }
)
# Methods that leave state on the channel: it cannot be handed to another client.
_DIRTYING = {
    c.BASIC_CONSUME: "consumer",
    c.BASIC_RECOVER: "recover",
    c.BASIC_RECOVER_ASYNC: "recover",
    c.TX_SELECT: "transaction",
    c.CHANNEL_FLOW: "flow",
}
_KEEP = memoryview(b"")  # _on_method's verdict "forward unchanged"
_ACKS = frozenset({c.BASIC_ACK, c.BASIC_NACK, c.BASIC_REJECT})
ACK_SIZE = 13  # class, method, delivery tag, bits: the only size the broker decodes
# Methods naming a queue: refused with 405 when another client of the pool owns it exclusively.
_QUEUE_METHODS = frozenset(
    {
        c.QUEUE_DECLARE,
        c.QUEUE_BIND,
        c.QUEUE_UNBIND,
        c.QUEUE_PURGE,
        c.QUEUE_DELETE,
        c.BASIC_CONSUME,
        c.BASIC_GET,
    }
)
_HEADER = struct.Struct(">BHI")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class State(Enum):
    HEADER = "header"  # waiting for the protocol header
    START = "start"  # Connection.Start sent
    TUNE = "tune"  # Connection.Tune sent
    OPEN_WAIT = "open-wait"  # TuneOk received, waiting for Connection.Open
    AUTHENTICATING = "authenticating"  # proving the credentials upstream
    OPEN = "open"
    CLOSING = "closing"  # our Connection.Close sent, waiting for CloseOk
    CLOSED = "closed"


class ClientConnection(HeartbeatMixin, asyncio.Protocol):
    """One client of the proxy."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.settings = proxy.settings
        self.registry = proxy.registry
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.state = State.HEADER
        self.user = ""  # for logs: the credentials stay bytes
        self.vhost = ""
        self._credentials = auth.Credentials(b"", b"")
        self._vhost = b""
        self.connection_name = ""
        self.wants_blocked = False
        self.pool: Pool | None = None
        self.leases: dict[int, Lease] = {}
        self._late_close_ok: set[int] = set()  # channels whose Close crossed the broker's
        self.exclusive_queues: dict[bytes, UpstreamConnection] = {}  # declared here, die with us
        self.frame_max = HANDSHAKE_FRAME_MAX
        self.max_body = HANDSHAKE_FRAME_MAX - c.FRAME_OVERHEAD
        self.channel_max = self.settings.channel_max
        self.heartbeat = 0
        self._rest = b""
        self._write_paused = False
        self._held: set[str] = set()  # why reading is paused: "upstream", "outbox", "backlog"
        self._sent_blocked = False  # we told the client Connection.Blocked (outbox full)
        self.identity = "?"  # describe() once admitted: outbox messages carry it for logs
        self._close_reason = ""
        self._timer: asyncio.TimerHandle | None = None
        self._init_heartbeat()

    def describe(self) -> str:
        name = f" ({self.connection_name})" if self.connection_name else ""
        return f"{self.user or '?'}@{self.vhost or '?'} from {self.peer}{name}"

    # ---- lifecycle -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # TCP_NODELAY is already on: uvloop and asyncio set it on every TCP transport.
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        self.proxy.client_connected(self)
        self._timer = self.loop.call_later(self.settings.handshake_timeout, self._handshake_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = self.pool is not None
        self.state = State.CLOSED
        self._stop_heartbeat()
        if self._timer is not None:
            self._timer.cancel()
        self._release_all("client left")
        self.registry.outbox.waiters.discard(self)
        if self.pool is not None:
            self.pool.client_gone(self)
        self.proxy.client_disconnected(self)
        if was_open:
            reason = self._close_reason or (f"connection lost: {exc}" if exc else "connection lost")
            hot_info(log, f"client {self.identity} disconnected: {reason}")

    def _handshake_expired(self) -> None:
        if self.state in (State.OPEN, State.CLOSING, State.CLOSED, State.AUTHENTICATING):
            return
        log.warning("client %s: handshake timed out in state %s", self.peer, self.state.value)
        if self.transport is not None:
            self.transport.abort()

    def _heartbeat_missed(self) -> None:
        self._close_reason = f"missed heartbeats ({self.heartbeat}s)"
        log.warning("client %s missed heartbeats; closing", self.describe())
        if self.transport is not None:
            self.transport.abort()

    def close_with(self, code: int, text: str, class_id: int = 0, method_id: int = 0) -> None:
        """Send Connection.Close and give up every lease; the client answers with CloseOk."""
        if self.state in (State.CLOSING, State.CLOSED) or self.transport is None:
            return
        before_open = self.state is not State.OPEN
        self.state = State.CLOSING
        self._close_reason = f"closed by amqproxy: {code} {text}"
        self._release_all("connection closed")
        level = logging.INFO if code in (c.REPLY_SUCCESS, c.CONNECTION_FORCED) else logging.WARNING
        if before_open and code in (c.ACCESS_REFUSED, c.NOT_ALLOWED):
            level = logging.WARNING
        log.log(level, "closing client %s: %d %s", self.describe(), code, text)
        self._write(
            frames.encode_method(
                0, commands.Connection.Close(code, frames.reply_text(text), class_id, method_id)
            )
        )
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(CLOSE_OK_TIMEOUT, self.transport.abort)

    def _release_all(self, why: str) -> None:
        """The client is leaving: give back its channels, delete its exclusive queues."""
        leases, self.leases = self.leases, {}
        if self.pool is None:
            return
        for lease in leases.values():
            self.pool.release(lease, why)
        queues, self.exclusive_queues = self.exclusive_queues, {}
        for name, conn in queues.items():
            if conn.pool.exclusive_owners.get(name) is self:
                del conn.pool.exclusive_owners[name]
            log.debug("deleting exclusive queue %r of client %s", name, self.describe())
            conn.delete_queue(name, "amqproxy: exclusive queue owner left")

    # ---- writing and flow control ------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._wrote = True
            self.transport.write(data)

    def send(self, pieces: list[Buffer]) -> None:
        """Write frames from the broker, in one call."""
        transport = self.transport
        if transport is None or self.state is not State.OPEN:
            return
        self._wrote = True
        transport.write(b"".join(pieces))
        if (
            self._write_paused
            and transport.get_write_buffer_size() > self.settings.max_client_buffer
        ):
            self._close_reason = "client too slow: outbound buffer limit reached"
            log.warning(
                "client %s reads too slowly (%d bytes buffered); disconnecting",
                self.describe(),
                transport.get_write_buffer_size(),
            )
            transport.abort()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False

    def hold_reading(self, reason: str) -> None:
        """Stop reading from the client until every reason to hold it is gone."""
        if not self._held and self.transport is not None:
            self.transport.pause_reading()
        self._held.add(reason)

    def release_reading(self, reason: str) -> None:
        if reason not in self._held:
            return
        self._held.discard(reason)
        if not self._held and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_reading(self) -> None:
        """An upstream this client writes to is full."""
        self.hold_reading("upstream")

    def resume_reading(self) -> None:
        self.release_reading("upstream")

    def _hold_for_outbox(self) -> None:
        """The outbox is full and this client adds to it: stop reading it (and tell it, if it
        understands Connection.Blocked) until the broker has taken enough."""
        self.hold_reading("outbox")
        self.registry.outbox.waiters.add(self)
        if self.wants_blocked and not self._sent_blocked:
            self._sent_blocked = True
            self._write(
                frames.encode_method(0, commands.Connection.Blocked("amqproxy outbox full"))
            )

    def outbox_ready(self) -> None:
        if self._sent_blocked:
            self._sent_blocked = False
            self._write(frames.method_frame(0, frames.CONNECTION_UNBLOCKED))
        self.release_reading("outbox")

    # ---- reading ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._read_seen = True
        if self._rest:
            data = self._rest + data
            self._rest = b""
        state = self.state
        try:
            if state is State.OPEN:
                self._process(data)
            elif state is State.HEADER:
                self._on_protocol_header(data)
            elif state is State.CLOSING:
                self._while_closing(data)
            elif state is not State.CLOSED:
                self._handshake(data)
        except Exception:  # a bug of ours: this client goes, the others stay
            self._internal_error("handling data")

    def _internal_error(self, doing: str, exc: BaseException | None = None) -> None:
        log.error(
            "internal error %s for client %s; closing it",
            doing,
            self.describe(),
            exc_info=exc or True,
        )
        self.close_with(c.INTERNAL_ERROR, "INTERNAL_ERROR - amqproxy internal error")
        if self.transport is not None:
            self.transport.abort()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run control-path work (an upstream round trip) beside the hot path."""
        task = self.loop.create_task(work, name=getattr(work, "__qualname__", "task"))
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            self._internal_error(f"in {task.get_name()}", exc)

    def _process(self, data: bytes) -> None:
        """The client-to-broker hot path.

        Walks frame headers only. Frames that go upstream unchanged are coalesced into runs, one
        slice of the read buffer per stretch, and a message goes upstream only once its last body
        byte has arrived: a message still incomplete when the read ends waits in its lease.
        Anything else (id rewrite, methods the proxy acts on) takes ``_frame``. At a message
        boundary, ``run_scan`` walks the whole plain messages and acks from there in one call
        (compiled when the extension is built), copied with the upstream channel's id when the
        client's differs.
        """
        view = memoryview(data)
        length = len(data)
        limit = self.max_body
        leases = self.leases
        unpack = _HEADER.unpack_from
        outs: dict[UpstreamConnection, list[Buffer]] = {}
        run_conn: UpstreamConnection | None = None  # a run of verbatim bytes for one upstream
        run_start = run_end = 0
        open_msg: Lease | None = None  # its message bytes since pub_start lie contiguous here
        pos = 0
        error: FrameError | None = None
        lease_open = LeaseState.OPEN
        fast_channel = -1
        fast_lease: Lease = None  # type: ignore[assignment]  # set before first use
        basic_publish = c.BASIC_PUBLISH
        acks = _ACKS
        flags_at = 0
        outbox = self.registry.outbox
        kept_before = outbox.bytes
        try:
            while length - pos >= 7:
                ftype, channel_id, size = unpack(data, pos)
                if size > limit:
                    raise FrameError(
                        c.FRAME_ERROR,
                        f"FRAME_ERROR - frame size {size + 8} exceeds frame_max {self.frame_max}",
                    )
                end = pos + 7 + size
                if end >= length:
                    break
                if data[end] != 0xCE:
                    raise FrameError(
                        c.FRAME_ERROR, f"FRAME_ERROR - bad frame end octet {data[end]:#04x}"
                    )
                nxt = end + 1
                mid = 0
                if channel_id == fast_channel:  # the last frame's lease: checks already done
                    lease: Lease | None = fast_lease
                else:
                    lease = leases.get(channel_id) if channel_id else None
                    if open_msg is not None and open_msg is not lease:
                        open_msg.pub_frames.append(view[open_msg.pub_start : pos])
                        open_msg = None
                    if lease is not None and lease.state is not lease_open:
                        lease = None
                if lease is not None and ftype == 1 and not lease.pub_stage:
                    # At a message boundary: the whole plain messages and acks from here go up
                    # in one call, copied with the upstream channel's id when it differs.
                    up = lease.up
                    assert up is not None
                    stop, published, moved = run_scan(
                        data,
                        pos,
                        channel_id,
                        min(limit, up.conn.frame_max - c.FRAME_OVERHEAD),
                        not lease.tag_offset,
                        up.id,
                    )
                    if stop > pos:
                        if up.confirm_mode:
                            up.published += published
                            if published and not lease.client_confirm:
                                up.outbox.add(
                                    up.published,
                                    published,
                                    (view[pos:stop] if moved is None else moved,),
                                    self.identity,
                                    self.loop.time(),
                                )
                        conn = up.conn
                        if moved is None and run_conn is conn and run_end == pos:
                            run_end = stop
                        else:
                            if run_conn is not None:
                                add_piece(outs, run_conn, view[run_start:run_end])
                            if moved is None:
                                run_conn, run_start, run_end = conn, pos, stop
                            else:
                                add_piece(outs, conn, moved)
                                run_conn = None
                        pos = stop
                        continue
                if lease is not None and not lease.verbatim:
                    lease = None  # another upstream channel id: frame by frame, rewritten
                if lease is not None and ftype == 1:
                    if lease.pub_stage:
                        raise frames.content_expected()
                    # Only what is checked here passes as it is: a Basic.Publish whose
                    # arguments end exactly with its flags octet, an ack of the exact size
                    # whose tag needs no translation. Anything else the slow path decodes.
                    mid = _U32.unpack_from(data, pos + 7)[0] if size >= 4 else 0
                    if mid == basic_publish:
                        flags_at = pos + 13  # after class, method, reserved ticket
                        if flags_at < end:
                            flags_at += 1 + data[flags_at]  # exchange
                            if flags_at < end:
                                flags_at += 1 + data[flags_at]  # routing key
                        if flags_at != end - 1:
                            lease = None
                    elif mid not in acks or size != ACK_SIZE or lease.tag_offset:
                        lease = None
                if lease is None:  # the slow path: anything the proxy must look at
                    fast_channel = -1
                    if run_conn is not None:
                        add_piece(outs, run_conn, view[run_start:run_end])
                        run_conn = None
                    self._frame(ftype, channel_id, data, view, pos, end, outs)
                    pos = nxt
                    if self.state is not State.OPEN:
                        break
                    continue
                fast_channel, fast_lease = channel_id, lease
                up = lease.up
                assert up is not None
                if ftype == 1:  # a method that passes through
                    if mid == basic_publish:
                        if data[flags_at]:
                            self._start_publish(lease, data[flags_at])
                        lease.pub_stage = 1
                        lease.pub_start = pos
                        open_msg = lease
                        pos = nxt
                        continue
                    start_of_run = pos
                elif ftype == 2 or ftype == 3:  # content header, body
                    if ftype == 2:
                        if lease.pub_stage != Lease.PUB_HEADER:
                            raise frames.header_without_publish(channel_id)
                        remaining = body_size(data, pos + 7, end)
                    else:
                        if lease.pub_stage != Lease.PUB_BODY:
                            raise frames.body_without_header(channel_id)
                        remaining = lease.pub_remaining - size
                        if remaining < 0:
                            raise frames.body_too_long()
                    if open_msg is not lease:
                        open_msg = lease
                        lease.pub_start = pos
                    if remaining:
                        lease.pub_stage = Lease.PUB_BODY
                        lease.pub_remaining = remaining
                        pos = nxt
                        continue
                    # The message is complete: it joins the bytes bound upstream.
                    open_msg = None
                    lease.pub_stage = Lease.PUB_NONE
                    if lease.pub_frames:
                        if run_conn is not None:
                            add_piece(outs, run_conn, view[run_start:run_end])
                            run_conn = None
                        lease.pub_frames.append(view[lease.pub_start : nxt])
                        self._published(lease, up, lease.pub_frames)
                        add_pieces(outs, up.conn, lease.pub_frames)
                        lease.pub_frames = []
                        pos = nxt
                        continue
                    self._published(lease, up, [view[lease.pub_start : nxt]])
                    start_of_run = lease.pub_start
                else:
                    raise frames.bad_frame_type(ftype, channel_id)
                conn = up.conn
                if run_conn is conn and run_end == start_of_run:
                    run_end = nxt
                else:
                    if run_conn is not None:
                        add_piece(outs, run_conn, view[run_start:run_end])
                    run_conn, run_start, run_end = conn, start_of_run, nxt
                pos = nxt
        except FrameError as exc:
            error = exc
        if open_msg is not None:
            open_msg.pub_frames.append(view[open_msg.pub_start : pos])
        if run_conn is not None:
            add_piece(outs, run_conn, view[run_start:run_end])
        if error is None and pos < length and self.state is State.OPEN:
            self._rest = data[pos:]
        self._flush(outs)
        if outbox.full and outbox.bytes > kept_before:
            self._hold_for_outbox()
        if error is not None:
            self.close_with(error.code, error.text)

    def _flush(self, outs: dict[UpstreamConnection, list[Buffer]]) -> None:
        """Write what this read produced, one write per upstream; pause if one is full."""
        for conn, pieces in outs.items():
            conn.send(pieces)
            if conn.paused:
                conn.waiting_clients.add(self)
                self.pause_reading()
        outs.clear()

    def _start_publish(self, lease: Lease, flags: int) -> None:
        """A Basic.Publish with mandatory (bit 0) or immediate (bit 1) set: its content
        follows."""
        if flags & 2:
            raise FrameError(c.NOT_IMPLEMENTED, "NOT_IMPLEMENTED - immediate=true")
        up = lease.up
        assert up is not None
        if flags & 1 and not up.confirm_mode:
            up.mark_dirty("mandatory publish without confirms")  # a return could come later
        lease.pub_stage = Lease.PUB_HEADER

    def _frame(
        self,
        ftype: int,
        channel_id: int,
        data: bytes,
        view: memoryview,
        pos: int,
        end: int,
        outs: dict[UpstreamConnection, list[Buffer]],
    ) -> None:
        """One frame off the fast path: channel 0, opening/closing channels, id rewrites,
        methods the proxy acts on, bodies to re-split."""
        start = pos + 7
        if channel_id == 0:
            self._flush(outs)  # connection-level actions may write upstream directly
            self._on_connection_frame(ftype, data, start, end)
            return
        lease = self.leases.get(channel_id)
        if lease is None:
            self._channel_open(ftype, channel_id, data, start, end)
            return
        if lease.state is not LeaseState.OPEN:
            self._on_frame_not_open(lease, ftype, data, start, end)
            return
        up = lease.up
        assert up is not None
        replaced: Buffer | None = None
        if ftype == c.FRAME_METHOD:
            if lease.pub_stage:
                raise frames.content_expected()
            if end - start < 4:
                raise methods.too_short(ftype, data, start, end)
            mid = frames.method_id_at(data, start)
            if mid not in methods.CLIENT_CHANNEL_METHODS:
                if mid == c.CHANNEL_OPEN:
                    raise FrameError(c.CHANNEL_ERROR, "CHANNEL_ERROR - second 'channel.open' seen")
                methods.decode(mid, data, start, end)  # like the broker: 501 first, if it is
                raise methods.not_for_clients(mid)  # malformed, else "unimplemented"
            args = methods.decode(mid, data, start, end)  # what the broker could not: refused
            if mid == c.BASIC_PUBLISH:
                self._start_publish(lease, args["mandatory"] | args["immediate"] << 1)
                lease.pub_frames = [frames.header(ftype, up.id, end - start), view[start : end + 1]]
                return
            if mid in _WATCHED:
                if mid == c.CHANNEL_CLOSE:
                    self._flush(outs)
                verdict = self._on_method(lease, mid, args, data, start, end)
                if verdict is None:
                    return
                if verdict is not _KEEP:
                    replaced = verdict
        elif ftype == c.FRAME_HEADER or ftype == c.FRAME_BODY:
            self._on_content(lease, ftype, view, start, end, outs)
            return
        else:
            raise frames.bad_frame_type(ftype, channel_id)
        if replaced is not None:
            add_pieces(
                outs, up.conn, [frames.header(ftype, up.id, len(replaced)), replaced, b"\xce"]
            )
        elif up.id == channel_id:
            add_piece(outs, up.conn, view[pos : end + 1])
        else:
            add_pieces(
                outs, up.conn, [frames.header(ftype, up.id, end - start), view[start : end + 1]]
            )

    def _on_content(
        self,
        lease: Lease,
        ftype: int,
        view: memoryview,
        start: int,
        end: int,
        outs: dict[UpstreamConnection, list[Buffer]],
    ) -> None:
        """Assemble a message frame by frame (ids rewritten or bodies re-split)."""
        up = lease.up
        assert up is not None
        size = end - start
        if ftype == c.FRAME_HEADER:
            if lease.pub_stage != Lease.PUB_HEADER:
                raise frames.header_without_publish(lease.channel_id)
            remaining = body_size(view, start, end)
        else:
            if lease.pub_stage != Lease.PUB_BODY:
                raise frames.body_without_header(lease.channel_id)
            remaining = lease.pub_remaining - size
            if remaining < 0:
                raise frames.body_too_long()
        upstream_max = up.conn.frame_max - c.FRAME_OVERHEAD
        if ftype == c.FRAME_BODY and size > upstream_max:
            lease.pub_frames.extend(frames.split_body(up.id, view[start:end], upstream_max))
        else:
            lease.pub_frames += (frames.header(ftype, up.id, size), view[start : end + 1])
        if remaining:
            lease.pub_stage = Lease.PUB_BODY
            lease.pub_remaining = remaining
            return
        self._published(lease, up, lease.pub_frames)
        add_pieces(outs, up.conn, lease.pub_frames)
        lease.pub_frames = []
        lease.pub_stage = Lease.PUB_NONE

    def _published(self, lease: Lease, up: UpstreamChannel, message: list[Buffer]) -> None:
        """One whole message goes upstream: count its confirm tag, keep it in the outbox
        unless its client takes the confirms itself."""
        if up.confirm_mode:
            up.published += 1
            if not lease.client_confirm:
                up.outbox.add(up.published, 1, tuple(message), self.identity, self.loop.time())

    def _on_method(
        self, lease: Lease, mid: int, args: dict[str, Any], data: bytes, start: int, end: int
    ) -> Buffer | None:
        """Act on a watched client method (``args``: its decoded arguments): None drops it,
        _KEEP forwards it, bytes replace it."""
        up = lease.up
        assert up is not None
        if mid == c.BASIC_ACK or mid == c.BASIC_NACK or mid == c.BASIC_REJECT:
            if lease.tag_offset:
                return frames.retag(data, start, end, start + 4, lease.tag_offset)
            return _KEEP
        if mid == c.CHANNEL_CLOSE:
            if up.reusable and self.settings.park_channels:
                assert self.pool is not None
                del self.leases[lease.channel_id]
                self.pool.release(lease, "channel closed")
                self._write(frames.method_frame(lease.channel_id, frames.CHANNEL_CLOSE_OK))
                return None
            lease.state = LeaseState.CLOSING
            up.state = ChannelState.CLOSING
            return _KEEP
        if mid == c.CHANNEL_CLOSE_OK:
            return None  # nothing of ours is waiting for it
        queue = args.get("queue", b"")
        if queue and mid in _QUEUE_METHODS and self._locked_out(lease, mid, queue):
            return None
        if mid == c.TX_SELECT and up.confirm_mode and not lease.client_confirm:
            # Every upstream channel is in confirm mode, and the broker refuses confirm -> tx:
            # move this client channel to a fresh upstream channel, then select tx there.
            self._swap_upstream(lease, data[start - 7 : end + 1])
            return None
        if mid in _DIRTYING:
            up.mark_dirty(_DIRTYING[mid])
        if mid == c.CONFIRM_SELECT:
            return self._confirm_select(lease, up, args["nowait"])
        if mid == c.BASIC_QOS:
            if args["prefetch_count"] or args["prefetch_size"]:
                up.mark_dirty("qos")
        elif mid == c.BASIC_GET:
            if not args["no_ack"]:
                up.mark_dirty("get with ack")
        elif mid == c.QUEUE_DECLARE:
            exclusive = args["exclusive"] and not args["passive"]
            if exclusive:
                up.mark_dirty("exclusive queue")
            if not args["nowait"]:
                lease.declares.append(exclusive)
            elif exclusive and queue:
                self.own_exclusive_queue(queue, up.conn)
        if mid in _ALWAYS_REPLIED or (mid in _NOWAIT_METHODS and not args["nowait"]):
            up.request_sent()
        return _KEEP

    def _locked_out(self, lease: Lease, mid: int, queue: bytes) -> bool:
        """``queue`` is another client's exclusive queue: 405 on this channel, as from the
        broker. Deleting one's own exclusive queue ends its ownership."""
        assert lease.up is not None
        owners = lease.up.conn.pool.exclusive_owners
        owner = owners.get(queue)
        if owner is not None and owner is not self:
            self._refuse_on_channel(
                lease,
                c.RESOURCE_LOCKED,
                f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue "
                f"'{auth.display(queue)}' in vhost '{self.vhost}'. It could be originally "
                "declared on another connection or the exclusive property value does not match "
                "that of the original declaration.",
                mid,
            )
            return True
        if mid == c.QUEUE_DELETE and owner is self:
            self.exclusive_queues.pop(queue, None)
            owners.pop(queue, None)
        return False

    def _confirm_select(self, lease: Lease, up: UpstreamChannel, nowait: bool) -> Buffer | None:
        """The client selects confirms: from now on it sees acks, numbered from its tag 1."""
        if not lease.client_confirm:
            # The client's tag 1 is the broker's next one (publishes before Select included).
            lease.client_confirm = True
            lease.confirm_offset = up.published
        if up.confirm_mode:  # the proxy's own confirm mode: answer here
            if not nowait:
                self._write(frames.method_frame(lease.channel_id, frames.CONFIRM_SELECT_OK))
            return None
        up.confirm_mode = True  # a channel without it (Tx): the broker answers, or refuses
        if not nowait:
            up.request_sent()
        return _KEEP

    def own_exclusive_queue(self, name: bytes, conn: UpstreamConnection) -> None:
        """``name`` is an exclusive queue this client declared: it dies when the client leaves,
        and other clients of the pool get 405 for it, as on a direct connection."""
        self.exclusive_queues[name] = conn
        conn.pool.exclusive_owners[name] = self

    def _refuse_on_channel(self, lease: Lease, code: int, text: str, mid: int) -> None:
        """Close a client channel the way the broker would, without involving the broker."""
        assert lease.up is not None
        lease.up.conn.pool.release(lease, "channel error answered by the proxy")
        lease.drop_partial_publish()
        lease.state = LeaseState.BROKER_CLOSED
        self._write(
            frames.encode_method(
                lease.channel_id,
                commands.Channel.Close(code, frames.reply_text(text), mid >> 16, mid & 0xFFFF),
            )
        )

    def _swap_upstream(self, lease: Lease, pending_frame: bytes) -> None:
        """Give back the lease's upstream channel and continue on a new one without confirm
        mode (``pending_frame``, the client's Tx.Select, goes first on it)."""
        assert lease.up is not None
        lease.up.conn.pool.release(lease, "client needs a channel without confirm mode")
        lease.state = LeaseState.OPENING
        lease.announced = True
        lease.backlog = []
        lease.queue_frame(pending_frame)
        self._spawn(self._open_upstream_channel(lease, confirm=False))

    def _on_frame_not_open(
        self, lease: Lease, ftype: int, data: bytes, start: int, end: int
    ) -> None:
        """Frames on a channel that is opening or closing."""
        state = lease.state
        if state is LeaseState.OPENING:
            if lease.announced and self._closed_while_waiting(lease, ftype, data, start):
                return
            if lease.queue_frame(data[start - 7 : end + 1]) > MAX_BACKLOG:
                self.hold_reading("backlog")  # resumed once the channel is bound
            return
        if ftype != c.FRAME_METHOD:
            return
        mid = frames.method_id_at(data, start)
        if state is LeaseState.CROSSED:
            if mid == c.CHANNEL_CLOSE_OK:  # for the broker's Close, answered upstream already
                lease.client_close_ok_due = False
                if lease.up is None:  # the broker's CloseOk came first
                    del self.leases[lease.channel_id]
            return
        if state is LeaseState.BROKER_CLOSED:
            # Like a broker: everything is discarded until the client's CloseOk.
            if mid == c.CHANNEL_CLOSE_OK:
                del self.leases[lease.channel_id]
            elif mid == c.CHANNEL_CLOSE:
                # Both sides closed at once: answer, and accept the CloseOk that may follow.
                del self.leases[lease.channel_id]
                self._late_close_ok.add(lease.channel_id)
                self._write(frames.method_frame(lease.channel_id, frames.CHANNEL_CLOSE_OK))

    def _closed_while_waiting(self, lease: Lease, ftype: int, data: bytes, start: int) -> bool:
        """Channel.Close on a channel still waiting for its upstream (an outage is held): when
        the client sent nothing but whole publishes, the proxy answers for them now."""
        if ftype != c.FRAME_METHOD or frames.method_id_at(data, start) != c.CHANNEL_CLOSE:
            return False
        if lease.backlog and not publishes_in(b"".join(lease.backlog))[1]:
            return False  # it waits for replies: the Close waits its turn behind them
        assert self.pool is not None
        del self.leases[lease.channel_id]
        self.pool.release(lease, "channel closed")
        self._write(frames.method_frame(lease.channel_id, frames.CHANNEL_CLOSE_OK))
        return True

    def _channel_open(self, ftype: int, channel_id: int, data: bytes, start: int, end: int) -> None:
        """Channel.Open on a new id: a parked channel or a new upstream one at once; while an
        outage is held, OpenOk at once and the channel waits for the broker."""
        mid = frames.method_id_at(data, start) if ftype == c.FRAME_METHOD else 0
        if channel_id in self._late_close_ok:
            self._late_close_ok.discard(channel_id)
            if mid == c.CHANNEL_CLOSE_OK:
                return
        if mid == c.CHANNEL_CLOSE:  # closed already (a second Close): RabbitMQ answers CloseOk
            self._write(frames.method_frame(channel_id, frames.CHANNEL_CLOSE_OK))
            return
        if mid != c.CHANNEL_OPEN:
            raise FrameError(
                c.CHANNEL_ERROR, f"CHANNEL_ERROR - expected 'channel.open' on channel {channel_id}"
            )
        if channel_id > self.channel_max:
            raise FrameError(
                c.NOT_ALLOWED,
                f"NOT_ALLOWED - channel {channel_id} is above the negotiated channel_max "
                f"{self.channel_max}",
            )
        pool = self.pool
        assert pool is not None
        lease = Lease(self, channel_id, self.registry.outbox)
        self.leases[channel_id] = lease
        up = pool.take_parked(channel_id) or pool.open_now(channel_id)
        if up is not None:
            lease.backlog = None
            lease.bind(up)
            self._write(frames.method_frame(channel_id, frames.CHANNEL_OPEN_OK))
            return
        if pool.holding():
            lease.announced = True
            self._write(frames.method_frame(channel_id, frames.CHANNEL_OPEN_OK))
        self._spawn(self._open_upstream_channel(lease))

    async def _open_upstream_channel(self, lease: Lease, confirm: bool = True) -> None:
        """Bind ``lease`` to a new upstream channel, announce it if the client still waits for
        its OpenOk, and pass on what the client sent meanwhile."""
        pool = self.pool
        assert pool is not None
        try:
            up = await pool.new_channel(lease.channel_id, confirm)
        except (UpstreamRefused, TimeoutError) as exc:
            if self.leases.get(lease.channel_id) is lease:
                code = getattr(exc, "code", c.CONNECTION_FORCED)
                text = getattr(exc, "text", "CONNECTION_FORCED - upstream channel open timed out")
                self.close_with(code, text)
            return
        if self.state is not State.OPEN or self.leases.get(lease.channel_id) is not lease:
            pool.release_unleased(up)
            return
        lease.bind(up)
        if not lease.announced:
            lease.announced = True
            self._write(frames.method_frame(lease.channel_id, frames.CHANNEL_OPEN_OK))
        backlog, counted = lease.take_backlog()
        if backlog:
            self._process(backlog)
        self.registry.outbox.remove(counted, 0)
        self.release_reading("backlog")

    def upstream_lost(self, leases: list[Lease], code: int, text: str, hold: bool) -> None:
        """The upstream connection under ``leases`` died. A client that only publishes without
        confirms does not notice: its channels wait for a new upstream channel (the outage hold)
        and the proxy replays what the broker did not confirm. Anyone else gets the close."""
        if not hold or not all(lease.detachable for lease in leases):
            self.close_with(code, text)
            return
        for lease in leases:
            lease.detach()
            self._spawn(self._open_upstream_channel(lease))

    def channel_closed_by_broker(self, lease: Lease, close_payload: bytes) -> None:
        """The broker closed this lease's channel: tell the client, discard until CloseOk.

        When the client's own Close is on its way upstream, the two crossed: as RabbitMQ does,
        the client gets the broker's Close now and the CloseOk for its Close when the broker
        sends it (the lease stays bound until then)."""
        lease.declares.clear()
        lease.drop_partial_publish()
        if lease.state is LeaseState.CLOSING:
            lease.state = LeaseState.CROSSED
            lease.client_close_ok_due = True
        else:
            lease.unbind()
            lease.state = LeaseState.BROKER_CLOSED
        self._write(frames.encode(c.FRAME_METHOD, lease.channel_id, close_payload))

    def channel_closed_upstream(self, lease: Lease) -> None:
        """The broker answered the client's own Channel.Close."""
        lease.unbind()
        self._write(frames.method_frame(lease.channel_id, frames.CHANNEL_CLOSE_OK))
        if lease.client_close_ok_due:
            return  # crossed: the lease ends with the client's CloseOk
        if self.leases.get(lease.channel_id) is lease:
            del self.leases[lease.channel_id]

    def _on_connection_frame(self, ftype: int, data: bytes, start: int, end: int) -> None:
        if ftype == c.FRAME_HEARTBEAT:
            return
        if ftype != c.FRAME_METHOD:
            raise FrameError(c.UNEXPECTED_FRAME, "UNEXPECTED_FRAME - content frame on channel 0")
        mid = frames.method_id_at(data, start)
        if mid == c.CONNECTION_CLOSE:
            self._write(frames.method_frame(0, frames.CONNECTION_CLOSE_OK))
            self._close_reason = "closed by client"
            self.state = State.CLOSED
            self._release_all("client closed the connection")
            if self.transport is not None:
                self.transport.close()
        elif mid == c.CONNECTION_CLOSE_OK:
            raise FrameError(c.COMMAND_INVALID, "COMMAND_INVALID - unexpected connection.close-ok")
        elif mid == c.CONNECTION_UPDATE_SECRET:
            args = methods.decode(mid, data, start, end)
            self._spawn(self._update_secret(args["new_secret"], auth.display(args["reason"])))
        else:
            raise FrameError(
                c.COMMAND_INVALID,
                f"COMMAND_INVALID - unexpected method {mid >> 16}.{mid & 0xFFFF} on channel 0",
            )

    def _while_closing(self, data: bytes) -> None:
        """After our Connection.Close only CloseOk (or the client's own Close) matters."""
        try:
            found, pos = frames.scan(data, max(self.frame_max, HANDSHAKE_FRAME_MAX))
        except FrameError:
            if self.transport is not None:
                self.transport.abort()
            return
        if pos < len(data):
            self._rest = data[pos:]
        for ftype, channel_id, start, _end in found:
            if ftype != c.FRAME_METHOD or channel_id != 0:
                continue
            mid = frames.method_id_at(data, start)
            if mid in (c.CONNECTION_CLOSE_OK, c.CONNECTION_CLOSE):
                if mid == c.CONNECTION_CLOSE:
                    self._write(frames.method_frame(0, frames.CONNECTION_CLOSE_OK))
                if self.transport is not None:
                    self.transport.close()
                return

    # ---- handshake --------------------------------------------------------------------------

    def _on_protocol_header(self, data: bytes) -> None:
        if len(data) < len(c.PROTOCOL_HEADER) and c.PROTOCOL_HEADER.startswith(data):
            self._rest = data
            return
        if data[:8] != c.PROTOCOL_HEADER:
            self._refuse_header()
            return
        self.state = State.START
        self._rest = data[8:]
        start = self.proxy.start_frame()
        if start is not None:
            self._send_start(start)
        else:
            self._spawn(self._learn_then_start())

    def _refuse_header(self) -> None:
        """A wrong protocol header gets the one we speak, then the socket closes (spec 4.2.2)."""
        log.info("client %s sent a bad protocol header; answering with 0-9-1", self.peer)
        if self.transport is not None:
            self.transport.write(c.PROTOCOL_HEADER)
            self.transport.close()
        self.state = State.CLOSED

    async def _learn_then_start(self) -> None:
        """First contact: the broker's properties are not known yet (bounded by timeouts)."""
        await self.proxy.server_properties()
        if self.state is State.START:
            self._send_start(self.proxy.start_frame() or self.proxy.fallback_start_frame())

    def _send_start(self, start: bytes) -> None:
        self._write(start)
        if self._rest:
            data, self._rest = self._rest, b""
            self._handshake(data)

    def _handshake(self, data: bytes) -> None:
        try:
            # What follows Connection.Open in the same read is ordinary traffic: scanned with
            # the broker's frame_max; the handshake's own frames are held to the limit below.
            found, pos = frames.scan(data, max(self.frame_max, self.registry.frame_max))
            for ftype, channel_id, start, end in found:
                if ftype == c.FRAME_HEARTBEAT:
                    continue
                if ftype != c.FRAME_METHOD or channel_id != 0:
                    raise FrameError(
                        c.UNEXPECTED_FRAME, "UNEXPECTED_FRAME - non-method frame during handshake"
                    )
                if end - start + c.FRAME_OVERHEAD > self.frame_max or end - start < 4:
                    raise FrameError(
                        c.FRAME_ERROR, f"FRAME_ERROR - handshake frame of {end - start} bytes"
                    )
                self._handshake_method(frames.method_id_at(data, start), data[start:end])
                state = self.state
                if state is State.OPEN:  # admitted at once: the rest is ordinary traffic
                    self._rest = b""
                    if end + 1 < len(data):
                        self._process(data[end + 1 :])
                    return
                if state in (State.CLOSING, State.CLOSED, State.AUTHENTICATING):
                    if state is State.AUTHENTICATING:
                        self._rest = data[end + 1 :]
                    return
            self._rest = data[pos:]
        except FrameError as exc:
            if self.state is State.START:
                # Before Tune the client may not be ready for Connection.Close; just hang up.
                log.warning("client %s: %s", self.peer, exc.text)
                if exc.code == c.ACCESS_REFUSED:
                    self.close_with(exc.code, exc.text)
                elif self.transport is not None:
                    self.transport.close()
            else:
                self.close_with(exc.code, exc.text)

    def _handshake_method(self, mid: int, payload: bytes) -> None:
        if self.state is State.START and mid == c.CONNECTION_START_OK:
            method = handshake.start_ok(payload)
            self.connection_name = method.connection_name
            self.wants_blocked = method.wants_blocked
            self._credentials = auth.credentials(method.mechanism, method.response)
            self.user = auth.display(self._credentials.user)
            self.state = State.TUNE
            self._write(self.proxy.tune_frame())
        elif self.state is State.TUNE and mid == c.CONNECTION_TUNE_OK:
            channel_max, frame_max, heartbeat = handshake.tune_ok(payload)
            offered = self.registry.frame_max
            frame_max = frame_max or offered
            if frame_max < c.FRAME_MIN_SIZE or frame_max > offered:
                raise FrameError(
                    c.NOT_ALLOWED,
                    f"NOT_ALLOWED - frame_max {frame_max} outside {c.FRAME_MIN_SIZE}..{offered}",
                )
            self.frame_max = frame_max
            self.max_body = frame_max - c.FRAME_OVERHEAD
            limit = self.settings.channel_max
            self.channel_max = min(channel_max, limit) if channel_max else limit
            self.heartbeat = heartbeat
            self._start_heartbeat(self.heartbeat)
            self.state = State.OPEN_WAIT
        elif self.state is State.OPEN_WAIT and mid == c.CONNECTION_OPEN:
            self._vhost = handshake.open_vhost(payload)
            self.vhost = auth.display(self._vhost)
            self.state = State.AUTHENTICATING
            if self._timer is not None:
                self._timer.cancel()
            pool = self.registry.pool(self._credentials, self._vhost)
            if pool.trusted():
                self._admitted(pool)  # proven recently: no task, no wait
            else:
                self._spawn(self._authenticate(pool))
        elif mid == c.CONNECTION_CLOSE:
            self._write(frames.method_frame(0, frames.CONNECTION_CLOSE_OK))
            self.state = State.CLOSED
            if self.transport is not None:
                self.transport.close()
        else:
            raise FrameError(
                c.COMMAND_INVALID,
                f"COMMAND_INVALID - unexpected method {mid >> 16}.{mid & 0xFFFF} "
                f"in handshake state {self.state.value}",
            )

    async def _authenticate(self, pool: Pool) -> None:
        """Prove the credentials with a new upstream connection, then OpenOk."""
        try:
            await pool.authenticate()
        except UpstreamRefused as exc:
            self.registry.maybe_drop(pool)
            if self.state is State.AUTHENTICATING:
                self.close_with(exc.code, exc.text, 10, 40)
            return
        if self.state is not State.AUTHENTICATING:
            self.registry.maybe_drop(pool)
            return
        self._admitted(pool)

    async def _update_secret(self, secret: bytes, reason: str) -> None:
        """Connection.UpdateSecret (OAuth 2 refresh): prove the new secret upstream; later
        channels use a pool authenticated with it. Channels already open stay where they are."""
        credentials = self._credentials._replace(password=secret)
        pool = self.registry.pool(credentials, self._vhost)
        try:
            await pool.authenticate()
        except UpstreamRefused as exc:
            self.registry.maybe_drop(pool)
            self.close_with(exc.code, exc.text, 10, 70)
            return
        old = self.pool
        if self.state is not State.OPEN or old is None:
            self.registry.maybe_drop(pool)
            return
        self._credentials = credentials
        self.pool = pool
        pool.client_added(self)
        if old is not pool:
            old.client_gone(self)
        self._write(frames.method_frame(0, frames.CONNECTION_UPDATE_SECRET_OK))
        log.info("client %s updated its secret (%s)", self.describe(), reason or "no reason given")

    def _admitted(self, pool: Pool) -> None:
        self.identity = self.describe()
        self.pool = pool
        pool.client_added(self)
        self.state = State.OPEN
        self._write(frames.method_frame(0, frames.CONNECTION_OPEN_OK))
        hot_info(log, f"client {self.identity} connected")
        if self._rest:
            data, self._rest = self._rest, b""
            self._process(data)
