"""Method arguments and content headers as the broker reads them: exact, bounded, bytes.

A frame the proxy forwards on a shared upstream connection that the broker cannot decode is a
*connection* error there — ``501 FRAME_ERROR - cannot decode``, or ``541 INTERNAL_ERROR`` for
content header properties — fatal for every client on that connection. So every client method
and content header is checked here before it goes upstream: arguments must be exactly what the
method's signature says (no byte missing, none left over), field tables well formed and at most
``MAX_TABLE_DEPTH`` deep (walked without recursion). Values are decoded to bytes and integers,
never to text, so that names reach the broker as the client sent them.

Signatures come from pamqp's method classes (the AMQP 0-9-1 spec with RabbitMQ's extensions).
"""

from __future__ import annotations

import struct
from typing import Any

from pamqp import commands

from amqproxy.amqp import constants as c
from amqproxy.amqp.frames import Buffer, FrameError, reply_text
from amqproxy.amqp.recent import Recent
from amqproxy.amqp.table import ARRAY, FIXED_SIZES, PREFIXED, TABLE

MAX_TABLE_DEPTH = 32  # nested tables and arrays; RabbitMQ has no limit, Python's decoders do

Field = tuple[str, str | tuple[str, ...]]  # (name, type) or ("", bit names packed in octets)
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_SIZES = {"octet": 1, "short": 2, "long": 4, "longlong": 8, "timestamp": 8}


def _signature(cls: Any) -> list[Field]:
    fields: list[Field] = []
    bits: list[str] = []
    for name in cls.__slots__:
        kind = cls.amqp_type(name)
        if kind == "bit":
            bits.append(name)
            if len(bits) == 8:
                fields.append(("", tuple(bits)))
                bits = []
            continue
        if bits:
            fields.append(("", tuple(bits)))
            bits = []
        fields.append((name, kind))
    if bits:
        fields.append(("", tuple(bits)))
    return fields


SIGNATURES: dict[int, list[Field]] = {
    index: _signature(cls) for index, cls in commands.INDEX_MAPPING.items()
}

# What a client may send on a channel (Channel.Open is handled before a lease exists).
CLIENT_CHANNEL_METHODS = frozenset(
    {
        c.CHANNEL_FLOW,
        c.CHANNEL_CLOSE,
        c.CHANNEL_CLOSE_OK,
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
        c.BASIC_PUBLISH,
        c.BASIC_GET,
        c.BASIC_ACK,
        c.BASIC_REJECT,
        c.BASIC_RECOVER_ASYNC,
        c.BASIC_RECOVER,
        c.BASIC_NACK,
        c.CONFIRM_SELECT,
        c.TX_SELECT,
        c.TX_COMMIT,
        c.TX_ROLLBACK,
    }
)


def not_for_clients(mid: int) -> FrameError:
    """A method a client may not send on a channel (server methods, connection methods, ids
    the spec does not have): RabbitMQ's answer."""
    return FrameError(c.COMMAND_INVALID, "COMMAND_INVALID - unimplemented method")


def too_short(ftype: int, data: Buffer, start: int, end: int) -> FrameError:
    """A frame too short for its type (a method without its ids): RabbitMQ's answer."""
    shown = ",".join(str(b) for b in bytes(data[start:end]))
    return FrameError(
        c.FRAME_ERROR, f"FRAME_ERROR - type {ftype}, all octets = <<{shown}>>: unknown_frame"
    )


def cannot_decode(arguments: Buffer) -> FrameError:
    """RabbitMQ's answer to arguments it cannot decode (a connection error)."""
    shown = ",".join(str(b) for b in bytes(arguments[:80]))
    more = ",..." if len(arguments) > 80 else ""
    return FrameError(c.FRAME_ERROR, reply_text(f"FRAME_ERROR - cannot decode <<{shown}{more}>>"))


def table_error(data: Buffer, start: int, end: int) -> str | None:
    """What is wrong with the field table ``data[start:end]`` (its content, without the
    length), or None. Depth-first with an explicit stack of at most MAX_TABLE_DEPTH levels."""
    stack: list[tuple[int, int, bool]] = []
    pos, stop, is_array = start, end, False
    while True:
        if pos >= stop:
            if pos > stop:
                return "value runs past its table"
            if not stack:
                return None
            pos, stop, is_array = stack.pop()
            continue
        if not is_array:
            pos += 1 + data[pos]  # field name
            if pos >= stop:
                return "truncated field"
        kind = data[pos]
        pos += 1
        if kind in PREFIXED:
            if pos + 4 > stop:
                return "truncated length"
            inner = pos + 4
            pos = inner + _U32.unpack_from(data, pos)[0]
            if pos > stop:
                return "value runs past its table"
            if kind == TABLE or kind == ARRAY:
                if len(stack) + 1 >= MAX_TABLE_DEPTH:
                    return f"tables nested deeper than {MAX_TABLE_DEPTH}"
                stack.append((pos, stop, is_array))
                pos, stop, is_array = inner, pos, kind == ARRAY
        elif kind in FIXED_SIZES:
            pos += FIXED_SIZES[kind]
        else:
            return f"unknown field type {kind:#04x}"


def _check_table_at(data: Buffer, pos: int, end: int) -> int:
    """The end of the length-prefixed table at ``pos``; FrameError when it is not valid."""
    if pos + 4 > end:
        raise ValueError("truncated table")
    size: int = _U32.unpack_from(data, pos)[0]
    stop = pos + 4 + size
    if stop > end:
        raise ValueError("table runs past the arguments")
    problem = table_error(data, pos + 4, stop)
    if problem is not None:
        if problem.startswith("tables nested"):
            raise FrameError(c.RESOURCE_ERROR, f"RESOURCE_ERROR - field {problem}")
        raise ValueError(problem)
    return stop


def decode(mid: int, data: Buffer, start: int, end: int) -> dict[str, Any]:
    """The arguments of the method frame whose payload is ``data[start:end]``: integers,
    booleans, and bytes for strings and tables (a table's content, without its length).

    Raises FrameError: 501 "cannot decode" unless the arguments are exactly the signature's,
    506 for tables nested too deep, 503 for a method id the proxy does not know."""
    signature = SIGNATURES.get(mid)
    if signature is None:
        raise FrameError(
            c.COMMAND_INVALID, f"COMMAND_INVALID - unknown method {mid >> 16}.{mid & 0xFFFF}"
        )
    values: dict[str, Any] = {}
    pos = start + 4
    try:
        for name, kind in signature:
            if isinstance(kind, tuple):
                bits = data[pos]
                pos += 1
                for i, bit_name in enumerate(kind):
                    values[bit_name] = bool(bits & (1 << i))
            elif kind == "shortstr":
                stop = pos + 1 + data[pos]
                values[name] = bytes(data[pos + 1 : stop])
                pos = stop
            elif kind == "longstr":
                stop = pos + 4 + _U32.unpack_from(data, pos)[0]
                values[name] = bytes(data[pos + 4 : stop])
                pos = stop
            elif kind == "table":
                stop = _check_table_at(data, pos, end)
                values[name] = bytes(data[pos + 4 : stop])
                pos = stop
            else:
                size = _SIZES[kind]
                values[name] = int.from_bytes(data[pos : pos + size], "big")
                pos += size
            if pos > end:
                raise ValueError("truncated")
    except (IndexError, ValueError, struct.error):
        raise cannot_decode(data[start + 4 : end]) from None
    if pos != end:
        raise cannot_decode(data[start + 4 : end])
    return values


# The arguments of the client method payloads decoded last: short-lived clients of one library
# send the same Channel.Close, Basic.Qos or Queue.Declare every time. What fails to decode is
# never kept.
DECODED: Recent[dict[str, Any]] = Recent(entries=256, max_size=256)


def decode_repeated(mid: int, data: Buffer, start: int, end: int) -> dict[str, Any]:
    """``decode``, answered from the payloads decoded last when this one is among them (a
    copy: the caller may change it). For channel methods of clients only: the payloads kept
    must hold no secret (Connection.UpdateSecret goes through ``decode``)."""
    if end - start > DECODED.max_size:
        return decode(mid, data, start, end)
    payload = bytes(data[start:end])
    known = DECODED.get(payload)
    if known is None:
        known = decode(mid, data, start, end)
        DECODED.keep(payload, known)
    return dict(known)


def encode(mid: int, **values: Any) -> bytes:
    """A method payload; strings and tables as bytes (a table's content, without its length)."""
    out = bytearray(_U32.pack(mid))
    for name, kind in SIGNATURES[mid]:
        if isinstance(kind, tuple):
            out.append(sum(1 << i for i, bit in enumerate(kind) if values.get(bit)))
        elif kind == "shortstr":
            value = values.get(name, b"")
            out += bytes([len(value)]) + value
        elif kind in ("longstr", "table"):
            value = values.get(name, b"")
            out += _U32.pack(len(value)) + value
        else:
            out += int(values.get(name, 0)).to_bytes(_SIZES[kind], "big")
    return bytes(out)


# Basic's content header properties, flag bit 15 first.
BASIC_PROPERTIES = (
    "shortstr",  # content-type
    "shortstr",  # content-encoding
    "table",  # headers
    "octet",  # delivery-mode
    "octet",  # priority
    "shortstr",  # correlation-id
    "shortstr",  # reply-to
    "shortstr",  # expiration
    "shortstr",  # message-id
    "longlong",  # timestamp
    "shortstr",  # type
    "shortstr",  # user-id
    "shortstr",  # app-id
    "shortstr",  # cluster-id
)
_KNOWN_FLAGS = 0xFFFC  # 14 properties; bit 1 unused, bit 0 would announce more flags


def content_header_error(data: Buffer, start: int, end: int) -> tuple[int, str] | None:
    """(reply code, text) for a content header payload the broker would choke on, or None.

    RabbitMQ closes the whole connection for these (505, or 541 when the properties do not
    decode): the proxy refuses them for their client alone."""
    size = end - start
    if size < 14:
        shown = ",".join(str(b) for b in bytes(data[start:end]))
        return c.FRAME_ERROR, f"FRAME_ERROR - type 2, all octets = <<{shown}>>: unknown_frame"
    class_id, weight = _U16.unpack_from(data, start)[0], _U16.unpack_from(data, start + 2)[0]
    if class_id != 60:
        return c.UNEXPECTED_FRAME, (
            "UNEXPECTED_FRAME - expected content header for class 60, "
            f"got one for class {class_id} instead"
        )
    if weight != 0:
        return c.UNEXPECTED_FRAME, (
            "UNEXPECTED_FRAME - expected content header for class 60, "
            "got non content header frame instead"
        )
    flags = _U16.unpack_from(data, start + 12)[0]
    bad = c.FRAME_ERROR, "FRAME_ERROR - malformed content header properties"
    if flags & ~_KNOWN_FLAGS:
        return bad
    pos = start + 14
    try:
        for bit, kind in zip(range(15, 1, -1), BASIC_PROPERTIES, strict=True):
            if not flags & (1 << bit):
                continue
            if kind == "shortstr":
                pos += 1 + data[pos]
            elif kind == "table":
                pos = _check_table_at(data, pos, end)
            else:
                pos += _SIZES[kind]
            if pos > end:
                return bad
    except IndexError:
        return bad
    except ValueError:
        return bad
    except FrameError as exc:
        return exc.code, exc.text
    return None if pos == end else bad


def body_size(data: Buffer, start: int, end: int) -> int:
    """The body size a content header announces, once the header passed the broker's checks
    (FrameError with the broker's code otherwise)."""
    problem = content_header_error(data, start, end)
    if problem is not None:
        raise FrameError(*problem)
    size: int = _U64.unpack_from(data, start + 4)[0]
    return size
