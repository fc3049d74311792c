"""Frame runs: how far a stream of plain frames for one channel goes, in one call.

The hot paths hand the bulk of a consumer's or publisher's stream to these functions: once a
frame on a channel has passed the full checks, the frames after it that need no decision
(content, Basic.Deliver, in-order confirms, whole Basic.Publish messages, acks) are walked here
instead of frame by frame in Python, and copied with the client's channel id and confirm tags
when those differ upstream.
``_scan.c`` implements them in C; the pure-Python versions below have the same contract and are
used when the extension is not built (or when AMQPROXY_PURE_PYTHON_SCANNER=1). Neither raises
on bad input: they stop, and the caller's full path re-reads the frame at the stop position and
answers it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from amqproxy.amqp import constants as c
from amqproxy.amqp.frames import publish_flags_at
from amqproxy.amqp.methods import content_header_error

_HEADER = struct.Struct(">BHI")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_ACKS = (c.BASIC_ACK, c.BASIC_NACK, c.BASIC_REJECT)

ClientScanner = Callable[[bytes, int, int, int, bool, int], tuple[int, int, bytes | None]]
BrokerScanner = Callable[
    [bytes, int, int, int, bool, int, int, int, bool], tuple[int, int, int, bytes | None]
]


def _frame_at(data: bytes, pos: int, channel: int, max_size: int) -> tuple[int, int]:
    """(type, payload size) of a complete, well-ended frame of `channel` at `pos`, else (0, -1)."""
    if len(data) - pos < 8:
        return 0, -1
    ftype, ch, size = _HEADER.unpack_from(data, pos)
    if size > max_size or ch != channel:
        return 0, -1
    if size >= len(data) - pos - 7 or data[pos + 7 + size] != c.FRAME_END:
        return 0, -1
    return ftype, size


def broker_run_py(
    data: bytes,
    pos: int,
    channel: int,
    max_size: int,
    deliver_ok: bool,
    confirmed: int,
    offset: int,
    to_channel: int,
    drop_acks: bool,
) -> tuple[int, int, int, bytes | None]:
    """Broker to client: content frames; Basic.Deliver when `deliver_ok`; Basic.Ack (publisher
    confirms) when `confirmed` >= 0, in order only (multiple, or the tag right after
    `confirmed`) and above `offset`, `confirmed` following the acks.

    Returns (stop position, deliveries walked, confirmed, moved): `moved` is None when the
    frames go out as they are, else a copy of data[pos:stop] with every channel id set to
    `to_channel` and every ack tag lowered by `offset` (the client's numbering); with
    `drop_acks` the acks are counted but left out of the copy (confirms the proxy takes for
    itself: the client did not ask for them)."""
    start = pos
    deliveries = 0
    dropped = False
    while True:
        ftype, size = _frame_at(data, pos, channel, max_size)
        if size < 0:
            break
        if ftype == c.FRAME_METHOD:
            mid = _U32.unpack_from(data, pos + 7)[0] if size >= 4 else 0
            if mid == c.BASIC_DELIVER and deliver_ok:
                deliveries += 1
            elif mid == c.BASIC_ACK and confirmed >= 0 and size >= 13:
                tag = _U64.unpack_from(data, pos + 11)[0]
                multiple = data[pos + 19] & 1
                if tag <= offset or tag >= 1 << 63 or not (multiple or tag == confirmed + 1):
                    break
                confirmed = max(confirmed, tag)
                dropped = dropped or drop_acks
            else:
                break
        elif ftype != c.FRAME_HEADER and ftype != c.FRAME_BODY:
            break
        pos += size + 8
    if pos == start or (to_channel == channel and not offset and not dropped):
        return pos, deliveries, confirmed, None
    return pos, deliveries, confirmed, _moved_copy(data, start, pos, to_channel, offset, dropped)


def _moved_copy(
    data: bytes, start: int, stop: int, to_channel: int, offset: int, drop_acks: bool = False
) -> bytes:
    """The complete frames data[start:stop] with every channel id set to `to_channel`, every
    Basic.Ack tag lowered by `offset` when it is not 0, and no Basic.Ack when `drop_acks`."""
    out = bytearray()
    to = to_channel.to_bytes(2, "big")
    at = start
    while at < stop:
        end = at + _U32.unpack_from(data, at + 3)[0] + 8
        is_ack = data[at] == c.FRAME_METHOD and _U32.unpack_from(data, at + 7)[0] == c.BASIC_ACK
        if not (is_ack and drop_acks):
            frame = bytearray(data[at:end])
            frame[1:3] = to
            if offset and is_ack:
                _U64.pack_into(frame, 11, _U64.unpack_from(frame, 11)[0] - offset)
            out += frame
        at = end
    return bytes(out)


def client_run_py(
    data: bytes, pos: int, channel: int, max_size: int, acks_ok: bool, to_channel: int
) -> tuple[int, int, bytes | None]:
    """Client to broker, from a message boundary: whole Basic.Publish messages without the
    mandatory/immediate flags, and Basic.Ack/Nack/Reject of the exact size when `acks_ok`.

    Returns (stop position, messages walked, moved); stops before a message not complete here.
    `moved` is None when `to_channel` is `channel` (the frames go up as they are), else a copy
    of data[pos:stop] with every channel id set to `to_channel`."""
    start = pos
    publishes = 0
    while True:
        ftype, size = _frame_at(data, pos, channel, max_size)
        if size < 4 or ftype != c.FRAME_METHOD:
            break
        mid = _U32.unpack_from(data, pos + 7)[0]
        nxt = pos + size + 8
        if mid in _ACKS:
            if not acks_ok or size != c.ACK_SIZE:
                break
            pos = nxt
            continue
        if mid != c.BASIC_PUBLISH:
            break
        flags = publish_flags_at(data, pos + 7, pos + 7 + size)
        if flags < 0 or data[flags]:
            break
        ftype, hsize = _frame_at(data, nxt, channel, max_size)
        if hsize < 14 or ftype != c.FRAME_HEADER:
            break
        if content_header_error(data, nxt + 7, nxt + 7 + hsize) is not None:
            break
        remaining = _U64.unpack_from(data, nxt + 11)[0]
        nxt += hsize + 8
        while remaining:
            ftype, bsize = _frame_at(data, nxt, channel, max_size)
            if bsize < 0 or ftype != c.FRAME_BODY or bsize > remaining:
                break
            remaining -= bsize
            nxt += bsize + 8
        if remaining:
            break
        publishes += 1
        pos = nxt
    if pos == start or to_channel == channel:
        return pos, publishes, None
    return pos, publishes, _moved_copy(data, start, pos, to_channel, 0)


broker_run: BrokerScanner = broker_run_py
client_run: ClientScanner = client_run_py
COMPILED = False
# AMQPROXY_PURE_PYTHON_SCANNER=1 runs the pure-Python twins (tests, diagnosis).
if os.environ.get("AMQPROXY_PURE_PYTHON_SCANNER", "") in ("", "0"):
    try:
        from amqproxy.amqp import _scan  # typed by _scan.pyi
    except ImportError:  # no compiler where it was installed: same results, more CPU per frame
        pass
    else:
        broker_run, client_run = _scan.broker_run, _scan.client_run
        COMPILED = True
