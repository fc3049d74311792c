"""The broker-to-client hot path of one upstream connection (docs/ARCHITECTURE.md).

A read is walked frame header by frame header; frames that reach a client unchanged travel
as stretches of the read buffer (``core.batch``), one write per client per read. For a leased
channel the scanner (``amqp.scan``) walks content, deliveries and in-order confirms in one
call, copied with the client's channel id and confirm tags where they differ. The methods
the proxy acts on (OpenOk, Close, CloseOk, confirms, replies that settle a channel, deliveries
whose tags it translates) take the slow path, one frame at a time.
"""

from __future__ import annotations

import struct
from typing import Protocol

from amqproxy.amqp import constants as c
from amqproxy.amqp import frames, methods
from amqproxy.amqp.auth import display
from amqproxy.amqp.frames import Buffer, FrameError
from amqproxy.amqp.scan import broker_run
from amqproxy.channel import ChannelState, Client, Connection, Lease, LeaseState, UpstreamChannel
from amqproxy.core.batch import Batch
from amqproxy.core.policy import BROKER_WATCHED, Verdict
from amqproxy.pool import Pool
from amqproxy.stats import PoolStats

_HEADER = struct.Struct(">BHI")
_U32 = struct.Struct(">I")
_TAG_AND_BITS = struct.Struct(">QB")
HEADER_SIZE = c.FRAME_HEADER_SIZE
FRAME_END = c.FRAME_END
LEASE_OPEN = LeaseState.OPEN


class Upstream(Connection, Protocol):
    """What the hot path needs of its connection (``core.upstream.UpstreamSession``)."""

    @property
    def pool(self) -> Pool: ...

    stats: PoolStats  # the pool's counters

    def write(self, data: bytes) -> None: ...

    def forget_channel(self, up: UpstreamChannel) -> None: ...

    def on_connection_frame(self, ftype: int, data: bytes, start: int, end: int) -> None: ...


class BrokerStream:
    """Walks what the broker sends on one connection."""

    def __init__(self, conn: Upstream) -> None:
        self.conn = conn
        # One batch for every read: most reads of a busy connection are confirms for the
        # proxy's own outbox, which produce nothing for a client. (It holds the last read
        # until the next one: one buffer per upstream connection.)
        self.batch: Batch[Client] = Batch(memoryview(b""))

    def process(self, data: bytes) -> bytes:
        """The broker-to-client hot path.

        Walks frame headers only; frames that reach a client unchanged are coalesced into
        stretches of the read buffer, and each client gets one write per read. For a leased
        channel, ``_run`` walks the plain frames from there in one scanner call.
        """
        conn = self.conn
        batch = self.batch
        batch.begin(memoryview(data))
        length = len(data)
        limit = conn.frame_max - c.FRAME_OVERHEAD
        channels = conn.channels
        unpack = _HEADER.unpack_from
        pos = 0
        while length - pos >= HEADER_SIZE:
            ftype, channel_id, size = unpack(data, pos)
            if size > limit:
                raise FrameError(c.FRAME_ERROR, f"FRAME_ERROR - broker frame of {size} bytes")
            end = pos + HEADER_SIZE + size
            if end >= length:
                break
            if data[end] != FRAME_END:
                raise FrameError(c.FRAME_ERROR, "FRAME_ERROR - bad frame end octet from broker")
            up = channels.get(channel_id) if channel_id else None
            lease = up.lease if up is not None else None
            if lease is not None and lease.state is LEASE_OPEN:
                assert up is not None
                stop = self._pass(batch, data, pos, end, limit, up, lease)
                if stop:
                    pos = stop
                    continue
            if batch.run_dest is not None:
                batch.cut()
            if channel_id == 0:
                conn.on_connection_frame(ftype, data, pos + HEADER_SIZE, end)
            elif up is not None:
                self._frame(up, ftype, channel_id, data, batch.view, pos, end, batch)
            pos = end + 1
        if batch.outs or batch.run_dest is not None:  # (a read of confirms may bring none)
            for client, pieces in batch.take().items():
                client.send(pieces)
        return data[pos:] if pos < length else b""

    def _pass(
        self, batch: Batch[Client], data: bytes, pos: int, end: int, limit: int,
        up: UpstreamChannel, lease: Lease,
    ) -> int:  # fmt: skip
        """Pass the frames from ``pos`` that need no decision to the lease's client: where
        they stop, or 0 when the frame at ``pos`` needs the slow path (``limit``: the largest
        frame payload of this connection).

        The scanner walks content, deliveries with untranslated tags and in-order confirms in
        one call, copied with the client's numbers when its channel id or confirm tags differ
        from the broker's, and without the confirms when the client did not select them (they
        are the outbox's)."""
        client = lease.client
        own = lease.client_confirm
        stop, delivered, confirmed, moved = broker_run(
            data,
            pos,
            up.id,
            min(limit, client.max_body),
            not lease.tag_offset,
            -1 if up.confirmed_ahead or not up.confirm_mode else up.confirmed,
            lease.confirm_offset if own else 0,
            lease.channel_id,
            not own,
        )
        if stop > pos:
            if delivered:
                up.delivered += delivered
                self.conn.stats.messages_out += delivered
            if confirmed >= 0:
                up.confirmed = confirmed
                if up.outbox.entries:
                    up.outbox.confirmed_through(confirmed)
            if moved is None:
                batch.stretch(client, pos, stop)
            elif moved:
                batch.piece(client, moved)
            return stop
        if not lease.verbatim or lease.confirm_offset or end - pos - 7 > client.max_body:
            return 0  # to translate or re-split, one frame at a time
        if data[pos] == c.FRAME_METHOD:
            mid = _U32.unpack_from(data, pos + 7)[0] if end - pos >= 11 else 0
            if mid == c.BASIC_ACK and own:
                # A confirm out of order, tags untranslated: record and pass.
                tag, bits = _TAG_AND_BITS.unpack_from(data, pos + 11)
                up.confirm(tag, bool(bits & 1))
            elif mid in BROKER_WATCHED:
                return 0  # the proxy acts on it
        batch.stretch(client, pos, end + 1)
        return end + 1

    def _frame(
        self,
        up: UpstreamChannel,
        ftype: int,
        channel_id: int,
        data: bytes,
        view: memoryview,
        pos: int,
        end: int,
        batch: Batch[Client],
    ) -> None:
        """One frame off the fast path: methods the proxy acts on, id rewrites, re-splits."""
        start = pos + 7
        replaced: Buffer | None = None
        if ftype == c.FRAME_METHOD:
            mid = frames.method_id_at(data, start)
            if mid in BROKER_WATCHED:
                verdict = self._on_method(up, mid, data, start, end)
                if verdict is Verdict.DROP:
                    return
                if verdict is not Verdict.FORWARD:
                    replaced = verdict
        lease = up.lease
        if lease is None or lease.state is not LeaseState.OPEN:
            return
        client = lease.client
        if replaced is not None:
            header = frames.header(ftype, lease.channel_id, len(replaced))
            batch.pieces(client, [header, replaced, c.FRAME_END_BYTE])
        elif ftype == c.FRAME_BODY and end - start > client.max_body:
            body = view[start:end]
            batch.pieces(client, list(frames.split_body(lease.channel_id, body, client.max_body)))
        elif lease.channel_id == channel_id:
            batch.piece(client, view[pos : end + 1])
        else:
            header = frames.header(ftype, lease.channel_id, end - start)
            batch.pieces(client, [header, view[start : end + 1]])

    # ---- broker methods ---------------------------------------------------------------------

    def _on_method(
        self, up: UpstreamChannel, mid: int, data: bytes, start: int, end: int
    ) -> Verdict | Buffer:
        """Act on a watched broker method: forward it, drop it, or forward a new payload."""
        lease = up.lease
        if mid in c.SYNC_REPLIES:
            up.reply_received()
        if mid == c.QUEUE_DECLARE_OK and lease is not None and lease.declares:
            if lease.declares.popleft():  # an exclusive queue: it dies with this client
                declared = methods.decode(mid, data, start, end)
                lease.client.own_exclusive_queue(declared["queue"], self.conn)
        if mid == c.BASIC_DELIVER or mid == c.BASIC_GET_OK:
            up.delivered += 1
            if lease is not None and lease.state is LeaseState.OPEN:
                self.conn.stats.messages_out += 1
            if lease is not None and lease.tag_offset:
                tag_at = frames.tag_position(mid, data, start)
                return frames.retag(data, start, end, tag_at, -lease.tag_offset)
        elif mid == c.BASIC_ACK or mid == c.BASIC_NACK:
            if up.confirm_mode:
                return self._on_confirm(up, mid == c.BASIC_NACK, data, start, end)
        elif mid == c.CHANNEL_OPEN_OK:
            up.opened()
            if lease is None:
                self.conn.pool.maybe_settled(up)
            return Verdict.DROP
        elif mid == c.CHANNEL_CLOSE:
            self._on_broker_channel_close(up, data, start, end)
            return Verdict.DROP
        elif mid == c.CHANNEL_CLOSE_OK:
            up.outbox.take()  # the broker handled everything sent before the Close
            self.conn.forget_channel(up)
            if lease is not None and lease.state in (LeaseState.CLOSING, LeaseState.CROSSED):
                lease.client.channel_closed_upstream(lease)
            return Verdict.DROP
        if lease is None:
            self.conn.pool.maybe_settled(up)
            return Verdict.DROP
        return Verdict.FORWARD

    def _on_confirm(
        self, up: UpstreamChannel, nack: bool, data: bytes, start: int, end: int
    ) -> Verdict | Buffer:
        """A publisher confirm: the outbox's, the client's (in its numbering), or both."""
        tag, multiple = frames.tag_and_flags(data, start)
        if nack and up.outbox:
            self.conn.pool.delivery.nacked(up, tag, multiple)
        up.confirm(tag, multiple)
        lease = up.lease
        if lease is None:
            self.conn.pool.maybe_settled(up)
            return Verdict.DROP
        if not lease.client_confirm or tag <= lease.confirm_offset:
            return Verdict.DROP  # the proxy's own, or of publishes from before Confirm.Select
        if lease.confirm_offset:
            return frames.retag(data, start, end, start + 4, -lease.confirm_offset)
        return Verdict.FORWARD

    def _on_broker_channel_close(
        self, up: UpstreamChannel, data: bytes, start: int, end: int
    ) -> None:
        """The broker closed a channel: answer it, free the id (once our own Close, if one
        crossed it, has its CloseOk too), settle its outbox, tell the lease's client."""
        self.conn.write(frames.method_frame(up.id, frames.CHANNEL_CLOSE_OK))
        close = methods.decode(c.CHANNEL_CLOSE, data, start, end)  # the text: bytes, as sent
        lease = up.lease
        crossed = up.state is ChannelState.CLOSING  # our Close is on its way: its CloseOk
        if not crossed:  # will follow, and the id stays taken until then
            self.conn.forget_channel(up)
        failed = c.method_id(close["class_id"], close["method_id"])
        orphan = lease is None and not crossed
        code, text = close["reply_code"], display(close["reply_text"])
        self.conn.pool.delivery.channel_closed_by_broker(up, code, text, failed, orphan=orphan)
        if lease is not None:
            lease.client.channel_closed_by_broker(lease, data[start:end])
