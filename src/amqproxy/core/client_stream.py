"""The client-to-broker hot path of one session (docs/ARCHITECTURE.md, "One publish").

A read is walked frame header by frame header. Frames that go upstream unchanged travel as
stretches of the read buffer (``core.batch``), one write per upstream connection per read; a
message goes upstream only once its last body byte has arrived (``core.publish``). At a
message boundary the scanner (``amqp.scan``, compiled when built) walks the plain messages
and acks from there in one call. Anything else (ids to rewrite, methods the proxy acts on,
bodies to re-split) takes the slow path, one frame at a time.
"""

from __future__ import annotations

import struct

from amqproxy.amqp import constants as c
from amqproxy.amqp import frames, methods
from amqproxy.amqp.frames import Buffer, FrameError, publish_flags_at
from amqproxy.amqp.scan import client_run
from amqproxy.channel import Connection, Lease, LeaseState, UpstreamChannel
from amqproxy.core.batch import Batch
from amqproxy.core.client_channels import ChannelTable
from amqproxy.core.policy import ACKS, CLIENT_WATCHED, Verdict
from amqproxy.core.publish import content_expected
from amqproxy.core.session import Session, State

_HEADER = struct.Struct(">BHI")
_U32 = struct.Struct(">I")
HEADER_SIZE = c.FRAME_HEADER_SIZE
OPEN = State.OPEN
FRAME_END = c.FRAME_END
NO_READ = memoryview(b"")


def bad_frame_type(ftype: int, channel: int) -> FrameError:
    kind = "heartbeat" if ftype == c.FRAME_HEARTBEAT else f"type {ftype}"
    return FrameError(c.FRAME_ERROR, f"FRAME_ERROR - {kind} frame on channel {channel}")


class ClientStream:
    """Walks what one client sends on its open connection."""

    def __init__(self, session: Session, channels: ChannelTable) -> None:
        self.session = session
        self.channels = channels
        # The lease whose message bytes lie next to each other in the current read buffer,
        # from ``message.start`` on (kept as one slice unless another channel interleaves).
        self.open_msg: Lease | None = None
        # One batch for every read (``Batch.begin``), as the broker's stream keeps: a
        # client's reads allocate none. It lets go of the read when done (an idle client
        # holds no buffer).
        self.batch: Batch[Connection] = Batch(NO_READ)

    def process(self, data: bytes) -> bytes:
        """One read; returns an incomplete frame at its end, kept for the next read."""
        session = self.session
        batch = self.batch
        batch.begin(memoryview(data))
        outbox = session.registry.outbox
        kept_before = outbox.bytes
        pos, error = self._walk(data, batch)
        if self.open_msg is not None:
            self._keep_partial(batch.view, pos)
        if batch.outs or batch.run_dest is not None:
            self.flush(batch)
        batch.view = NO_READ
        if outbox.full and outbox.bytes > kept_before:
            session.hold_for_outbox()
        if error is not None:
            session.close_with(error.code, error.text)
            return b""
        if pos >= len(data):
            return b""
        return data[pos:] if session.state is OPEN else b""

    def _walk(self, data: bytes, batch: Batch[Connection]) -> tuple[int, FrameError | None]:
        """Frame by frame (run by run where the scanner can): where the walk stopped, and
        the error that stopped it, if one did."""
        session = self.session
        limit = session.max_body
        length = len(data)
        unpack = _HEADER.unpack_from
        cached_id = -1  # the channel of the last frame that took the fast path
        lease: Lease | None = None
        pos = 0
        try:
            while length - pos >= HEADER_SIZE:
                ftype, channel_id, size = unpack(data, pos)
                if size > limit:
                    raise frames.too_large(size, session.frame_max)
                end = pos + HEADER_SIZE + size
                if end >= length:
                    break
                if data[end] != FRAME_END:
                    raise frames.bad_end(data[end])
                if channel_id != cached_id:
                    cached_id = channel_id
                    lease = self._lease_for(channel_id, batch.view, pos)
                if lease is not None:
                    if ftype == c.FRAME_METHOD:  # a message boundary: runs for the scanner, else
                        if lease.message.stage:  # a publish or an ack that passes
                            raise content_expected()
                        stop = self._run(lease, data, pos, batch)
                        if not stop and lease.verbatim:
                            stop = self._method(lease, data, pos, end, batch)
                    else:
                        stop = self._fast(lease, ftype, data, pos, end, batch)
                    if stop:
                        pos = stop
                        continue
                cached_id = -1  # the slow path may change the lease
                if batch.run_dest is not None:
                    batch.cut()
                self._slow(ftype, channel_id, data, batch, pos, end)
                pos = end + 1
                if session.state is not OPEN:
                    break
        except FrameError as exc:
            return pos, exc
        return pos, None

    def _lease_for(self, channel_id: int, view: memoryview, pos: int) -> Lease | None:
        """The open lease of ``channel_id``, if it has one; a message of another channel
        that was being read keeps what it has so far (``pos``: where the walk is)."""
        lease = self.channels.leases.get(channel_id) if channel_id else None
        if self.open_msg is not None:
            self._keep_partial(view, pos, unless=lease)
        if lease is None or lease.state is not LeaseState.OPEN:
            return None
        if self.channels.split.tentative and lease in self.channels.split.tentative:
            return None  # its publishes are looked at one by one (``core.split``)
        return lease

    def _keep_partial(self, view: memoryview, pos: int, unless: Lease | None = None) -> None:
        open_msg = self.open_msg
        if open_msg is not None and open_msg is not unless:
            message = open_msg.message
            message.frames.append(view[message.start : pos])
            self.open_msg = None

    def flush(self, batch: Batch[Connection]) -> None:
        """Queue what the walk produced, per upstream; stop reading when one is full."""
        for conn, pieces in batch.take().items():
            conn.send(pieces)
            if conn.paused:
                conn.wait_for_room(self.session)
                self.session.host.hold("upstream")

    # ---- the fast path ------------------------------------------------------------------------

    def _fast(
        self, lease: Lease, ftype: int, data: bytes, pos: int, end: int, batch: Batch[Connection]
    ) -> int:
        """A content frame of an open lease that needs no decision: where the walk goes on,
        or 0 for the slow path (method frames: ``_walk``)."""
        if not lease.verbatim:
            return 0
        if ftype == c.FRAME_HEADER or ftype == c.FRAME_BODY:
            return self._content(lease, ftype, data, pos, end, batch)
        raise bad_frame_type(ftype, lease.channel_id)

    def _run(self, lease: Lease, data: bytes, pos: int, batch: Batch[Connection]) -> int:
        """At a message boundary: the whole plain messages and acks from ``pos`` go upstream
        in one scanner call, copied with the upstream channel's id when it differs."""
        up = lease.up
        assert up is not None
        conn = up.conn
        max_size = min(self.session.max_body, conn.frame_max - c.FRAME_OVERHEAD)
        stop, published, moved = client_run(
            data, pos, lease.channel_id, max_size, not lease.tag_offset, up.id
        )
        if stop == pos:
            return 0
        if published:
            pool = self.session.pool  # (the pool's totals, for /api/pools: no call per run)
            if pool is not None:
                pool.stats.messages_in += published
            if up.confirm_mode:
                up.published += published
                if not lease.client_confirm:
                    run = batch.view[pos:stop] if moved is None else moved
                    self._keep(up, published, (run,))
        if moved is None:
            batch.stretch(conn, pos, stop)
        else:
            batch.piece(conn, moved)
        return stop

    def _method(
        self, lease: Lease, data: bytes, pos: int, end: int, batch: Batch[Connection]
    ) -> int:
        """A method the scanner stopped at: a Basic.Publish whose arguments end exactly with
        its flags octet starts a message; an ack of the exact size whose tag needs no
        translation passes. Anything else the slow path decodes."""
        size = end - pos - HEADER_SIZE
        mid = _U32.unpack_from(data, pos + HEADER_SIZE)[0] if size >= 4 else 0
        if mid == c.BASIC_PUBLISH:
            flags_at = publish_flags_at(data, pos + HEADER_SIZE, end)
            if flags_at < 0:
                return 0
            self._begin(lease, data[flags_at])
            lease.message.start = pos
            self.open_msg = lease
            return end + 1
        if mid in ACKS and size == c.ACK_SIZE and not lease.tag_offset:
            assert lease.up is not None
            batch.stretch(lease.up.conn, pos, end + 1)
            return end + 1
        return 0

    def _content(
        self, lease: Lease, ftype: int, data: bytes, pos: int, end: int, batch: Batch[Connection]
    ) -> int:
        """A content frame that passes as it is; the last one sends the whole message."""
        message = lease.message
        complete = message.content(ftype, data, pos + HEADER_SIZE, end, lease.channel_id)
        if self.open_msg is not lease:
            self.open_msg = lease
            message.start = pos
        nxt = end + 1
        if not complete:
            return nxt
        self.open_msg = None
        up = lease.up
        assert up is not None
        if message.frames:  # parts from earlier reads, or before another channel's frames
            pieces = message.take()
            pieces.append(batch.view[message.start : nxt])
            self._published(lease, up, pieces)
            batch.pieces(up.conn, pieces)
        else:
            self._published(lease, up, [batch.view[message.start : nxt]])
            batch.stretch(up.conn, message.start, nxt)
        return nxt

    # ---- messages -----------------------------------------------------------------------------

    def _begin(self, lease: Lease, flags: int) -> None:
        """A Basic.Publish: its content follows. A mandatory one without confirms leaves the
        channel unfit for another client (a Basic.Return could come at any time)."""
        lease.message.begin(flags)
        up = lease.up
        assert up is not None
        if flags & c.PUBLISH_MANDATORY and not up.confirm_mode:
            up.mark_dirty("mandatory publish without confirms")

    def _published(self, lease: Lease, up: UpstreamChannel, message: list[Buffer]) -> None:
        """One whole message goes upstream: count its confirm tag, keep it in the outbox
        unless its client takes the confirms itself."""
        self._count(1)
        if up.confirm_mode:
            up.published += 1
            if not lease.client_confirm:
                self._keep(up, 1, tuple(message))

    def _count(self, messages: int) -> None:
        """Messages published, for the pool's totals (``/api/pools``)."""
        pool = self.session.pool
        if pool is not None:
            pool.stats.messages_in += messages

    def _keep(self, up: UpstreamChannel, count: int, pieces: tuple[Buffer, ...]) -> None:
        session = self.session
        up.outbox.add(up.published, count, pieces, session.identity, session.host.now())

    # ---- the slow path ------------------------------------------------------------------------

    def _slow(
        self,
        ftype: int,
        channel_id: int,
        data: bytes,
        batch: Batch[Connection],
        pos: int,
        end: int,
    ) -> None:
        """One frame off the fast path: channel 0, opening/closing channels, id rewrites,
        methods the proxy acts on, bodies to re-split."""
        session = self.session
        start = pos + HEADER_SIZE
        if channel_id == 0:
            self.flush(batch)  # connection-level actions may write upstream directly
            session.on_connection_frame(ftype, data, start, end)
            return
        table = self.channels
        lease = table.leases.get(channel_id)
        if lease is None:
            table.open(ftype, channel_id, data, start)
        elif lease.state is not LeaseState.OPEN:
            table.not_open(lease, ftype, data, start, end)
        elif ftype == c.FRAME_METHOD:
            self._slow_method(lease, data, batch, pos, end)
        elif ftype == c.FRAME_HEADER or ftype == c.FRAME_BODY:
            self._slow_content(lease, ftype, batch.view, start, end, batch)
        else:
            raise bad_frame_type(ftype, channel_id)

    def _slow_method(
        self, lease: Lease, data: bytes, batch: Batch[Connection], pos: int, end: int
    ) -> None:
        """A method on an open lease, decoded: what the broker could not decode is refused
        here, as the broker would (501/502/503/540), before it reaches a shared upstream."""
        start = pos + HEADER_SIZE
        if lease.message.stage:
            raise content_expected()
        if end - start < 4:
            raise methods.too_short(c.FRAME_METHOD, data, start, end)
        mid = frames.method_id_at(data, start)
        if mid not in methods.CLIENT_CHANNEL_METHODS:
            if mid == c.CHANNEL_OPEN:
                raise FrameError(c.CHANNEL_ERROR, "CHANNEL_ERROR - second 'channel.open' seen")
            methods.decode(mid, data, start, end)  # like the broker: 501 first, if it is
            raise methods.not_for_clients(mid)  # malformed, else "unimplemented"
        args = methods.decode_repeated(mid, data, start, end)
        up = lease.up
        assert up is not None
        view = batch.view
        if mid == c.BASIC_PUBLISH:
            if lease in self.channels.split.tentative:
                self.flush(batch)  # what it sent before goes first, where it was going
                if self.channels.publishing(lease, data[pos : end + 1]):
                    return  # back to a publish connection: the message follows it there
            self._begin(lease, args["mandatory"] | args["immediate"] << 1)
            header = frames.header(c.FRAME_METHOD, up.id, end - start)
            lease.message.frames = [header, view[start : end + 1]]
            return
        verdict: Verdict | Buffer = Verdict.FORWARD
        if mid in CLIENT_WATCHED:
            self.flush(batch)  # what the proxy does may write upstream directly
            verdict = self.channels.on_method(lease, mid, args, data, start, end)
        if verdict is Verdict.DROP:
            return
        conn = up.conn
        if verdict is not Verdict.FORWARD:
            assert not isinstance(verdict, Verdict)
            replaced = [frames.header(c.FRAME_METHOD, up.id, len(verdict)), verdict]
            batch.pieces(conn, [*replaced, c.FRAME_END_BYTE])
        elif up.id == lease.channel_id:
            batch.piece(conn, view[pos : end + 1])
        else:
            batch.pieces(
                conn, [frames.header(c.FRAME_METHOD, up.id, end - start), view[start : end + 1]]
            )

    def _slow_content(
        self,
        lease: Lease,
        ftype: int,
        view: memoryview,
        start: int,
        end: int,
        batch: Batch[Connection],
    ) -> None:
        """A content frame with the upstream channel's id, or a body re-split to fit the
        upstream frame_max; the message goes once it is whole."""
        up = lease.up
        assert up is not None
        message = lease.message
        complete = message.content(ftype, view, start, end, lease.channel_id)
        size = end - start
        upstream_max = up.conn.frame_max - c.FRAME_OVERHEAD
        if ftype == c.FRAME_BODY and size > upstream_max:
            message.frames.extend(frames.split_body(up.id, view[start:end], upstream_max))
        else:
            message.frames += (frames.header(ftype, up.id, size), view[start : end + 1])
        if complete:
            pieces = message.take()
            self._published(lease, up, pieces)
            batch.pieces(up.conn, pieces)
