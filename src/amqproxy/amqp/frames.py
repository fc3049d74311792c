"""Frame scanning, rewriting and encoding: bytes in, bytes out, no I/O.

The proxy's hot path walks frame headers with ``struct.unpack_from`` and rewrites the 2-byte
channel id; only the methods the proxy must act on are decoded with pamqp.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from pamqp import commands, frame
from pamqp.base import Frame as Method

from amqproxy.amqp import constants as c

Buffer = bytes | bytearray | memoryview

_HEADER = struct.Struct(">BHI")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_TAG_AND_BITS = struct.Struct(">QB")

HEARTBEAT: bytes = b"\x08\x00\x00\x00\x00\x00\x00\xce"


def _payload(method: Method) -> bytes:
    return frame.marshal(method, 0)[7:-1]


# Payloads of the argument-less methods the proxy sends itself, encoded once.
CHANNEL_OPEN = _payload(commands.Channel.Open())
CONFIRM_SELECT_NOWAIT = _payload(commands.Confirm.Select(nowait=True))
CONNECTION_OPEN_OK = _payload(commands.Connection.OpenOk())
CONNECTION_CLOSE_OK = _payload(commands.Connection.CloseOk())
CHANNEL_OPEN_OK = _payload(commands.Channel.OpenOk())
CHANNEL_CLOSE_OK = _payload(commands.Channel.CloseOk())
CONFIRM_SELECT_OK = _payload(commands.Confirm.SelectOk())
CONNECTION_UNBLOCKED = _payload(commands.Connection.Unblocked())
CONNECTION_UPDATE_SECRET_OK = _payload(commands.Connection.UpdateSecretOk())


def reply_text(text: str) -> str:
    """A reply text that fits its shortstr (255 bytes), cut on a character boundary."""
    raw = text.encode("utf-8")
    return text if len(raw) <= 255 else raw[:255].decode("utf-8", "ignore")


def method_frame(channel: int, payload: bytes) -> bytes:
    """A method frame around an already encoded payload."""
    return b"".join(
        (_HEADER.pack(c.FRAME_METHOD, channel, len(payload)), payload, c.FRAME_END_BYTE)
    )


class FrameError(Exception):
    """A peer broke the framing rules; the connection must be closed with ``code``."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


# One scanned frame: (type, channel, payload start, payload end) as offsets into the buffer.
ScannedFrame = tuple[int, int, int, int]


def too_large(size: int, frame_max: int) -> FrameError:
    """A frame whose payload ``size`` is over ``frame_max``, as RabbitMQ words it."""
    return FrameError(
        c.FRAME_ERROR,
        f"FRAME_ERROR - frame size {size + c.FRAME_OVERHEAD} exceeds frame_max {frame_max}",
    )


def bad_end(octet: int) -> FrameError:
    return FrameError(c.FRAME_ERROR, f"FRAME_ERROR - bad frame end octet {octet:#04x}")


def scan(data: Buffer, frame_max: int) -> tuple[list[ScannedFrame], int]:
    """Find the complete frames at the start of ``data``.

    Returns the frames and the offset of the first byte not consumed (a partial frame).
    Raises FrameError for a frame above ``frame_max`` or a bad frame-end octet.
    """
    frames: list[ScannedFrame] = []
    pos = 0
    size_limit = frame_max - c.FRAME_OVERHEAD
    length = len(data)
    unpack = _HEADER.unpack_from
    while length - pos >= c.FRAME_HEADER_SIZE:
        ftype, channel, size = unpack(data, pos)
        if size > size_limit:
            raise too_large(size, frame_max)
        end = pos + c.FRAME_HEADER_SIZE + size
        if end >= length:
            break
        if data[end] != c.FRAME_END:
            raise bad_end(data[end])
        frames.append((ftype, channel, pos + c.FRAME_HEADER_SIZE, end))
        pos = end + 1
    return frames, pos


def header(ftype: int, channel: int, size: int) -> bytes:
    """The 7-byte header of a frame."""
    return _HEADER.pack(ftype, channel, size)


def encode(ftype: int, channel: int, payload: Buffer) -> bytes:
    """A whole frame around ``payload``."""
    return b"".join((_HEADER.pack(ftype, channel, len(payload)), payload, c.FRAME_END_BYTE))


def encode_method(channel: int, method: Method) -> bytes:
    """A method frame, encoded by pamqp."""
    return frame.marshal(method, channel)


def method_id_at(data: Buffer, start: int) -> int:
    """The class/method id of the method frame whose payload starts at ``start``."""
    value: int = _U32.unpack_from(data, start)[0]
    return value


def decode_method(payload: Buffer) -> Method:
    """Decode a method frame payload (class id, method id, arguments) with pamqp."""
    index = _U32.unpack_from(payload, 0)[0]
    try:
        method: Method = commands.INDEX_MAPPING[index]()
    except KeyError:
        raise FrameError(
            c.COMMAND_INVALID, f"COMMAND_INVALID - unknown method {index >> 16}.{index & 0xFFFF}"
        ) from None
    try:
        method.unmarshal(bytes(payload[4:]))
    except Exception as exc:  # pamqp raises struct.error, ValueError, UnicodeDecodeError
        raise FrameError(c.SYNTAX_ERROR, f"SYNTAX_ERROR - malformed {method.name}: {exc}") from None
    return method


def publish_flags_at(data: Buffer, start: int, end: int) -> int:
    """Where the flags octet of the Basic.Publish payload ``data[start:end]`` lies, or -1
    unless its arguments are exactly ticket, exchange, routing key and that octet (anything
    else is for the full decoder)."""
    at = start + 6  # class, method, reserved ticket
    if at >= end:
        return -1
    at += 1 + data[at]  # exchange
    if at >= end:
        return -1
    at += 1 + data[at]  # routing key
    return at if at == end - 1 else -1


def tag_position(mid: int, data: Buffer, start: int) -> int:
    """Offset of the 64-bit delivery tag in a Deliver, GetOk, Ack, Nack or Reject payload."""
    if mid == c.BASIC_DELIVER:
        return start + 4 + 1 + data[start + 4]  # after the consumer tag shortstr
    return start + 4


def tag_and_flags(data: Buffer, start: int) -> tuple[int, bool]:
    """(delivery tag, multiple) of an Ack or Nack payload."""
    tag, bits = _TAG_AND_BITS.unpack_from(data, start + 4)
    return tag, bool(bits & 1)


def retag(data: Buffer, start: int, end: int, tag_pos: int, delta: int) -> bytearray:
    """A copy of the payload ``data[start:end]`` with its delivery tag shifted by ``delta``.

    Tag 0 (``multiple`` meaning "everything so far") stays 0.
    """
    payload = bytearray(data[start:end])
    offset = tag_pos - start
    tag = _U64.unpack_from(payload, offset)[0]
    if tag:
        _U64.pack_into(payload, offset, tag + delta)
    return payload


def split_body(channel: int, body: Buffer, max_payload: int) -> Iterable[bytes]:
    """Body frames carrying ``body`` in pieces of at most ``max_payload`` bytes."""
    view = memoryview(body)
    for pos in range(0, len(view), max_payload):
        chunk = view[pos : pos + max_payload]
        yield _HEADER.pack(c.FRAME_BODY, channel, len(chunk))
        yield bytes(chunk)
        yield c.FRAME_END_BYTE
