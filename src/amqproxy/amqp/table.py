"""AMQP field tables walked as bytes: no decoding to Python values, no recursion.

The proxy forwards tables it receives (client properties, arguments, headers) as they are; it
only needs to find a few entries (AMQPLAIN's LOGIN and PASSWORD) and to know that a table is
well formed and within bounds before anything else decodes it. Values stay bytes, so that
credentials and names reach the broker exactly as the client sent them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from amqproxy.amqp.frames import Buffer

# Value sizes by type octet: the types RabbitMQ 3.10 decodes (probed one by one against it);
# length-prefixed types carry a 32-bit size. 's' is a 16-bit integer in RabbitMQ's dialect.
FIXED_SIZES = {
    ord("t"): 1,
    ord("b"): 1,
    ord("B"): 1,
    ord("s"): 2,
    ord("u"): 2,
    ord("I"): 4,
    ord("i"): 4,
    ord("l"): 8,
    ord("L"): 8,
    ord("f"): 4,
    ord("d"): 8,
    ord("D"): 5,
    ord("T"): 8,
    ord("V"): 0,
}
LONG_STRING = ord("S")
TABLE = ord("F")
ARRAY = ord("A")
BYTES = ord("x")
PREFIXED = frozenset({LONG_STRING, TABLE, ARRAY, BYTES})
_U32 = struct.Struct(">I")


class TableError(ValueError):
    """The bytes are not a well-formed field table (or break a bound)."""


def _value_end(data: Buffer, pos: int, kind: int, end: int) -> int:
    """Where the value of type ``kind`` that starts at ``pos`` ends."""
    if kind in PREFIXED:
        if pos + 4 > end:
            raise TableError("truncated length")
        size: int = _U32.unpack_from(data, pos)[0]
        stop = pos + 4 + size
    elif kind in FIXED_SIZES:
        stop = pos + FIXED_SIZES[kind]
    else:
        raise TableError(f"unknown field type {kind:#04x}")
    if stop > end:
        raise TableError("value runs past the table")
    return stop


def items(table: Buffer) -> Iterator[tuple[bytes, int, memoryview]]:
    """(name, type octet, value bytes) of each entry of a table given without its length
    prefix; a nested table or array comes as its bytes, length prefix included."""
    view = memoryview(table)
    pos, end = 0, len(view)
    while pos < end:
        name_end = pos + 1 + view[pos]
        if name_end + 1 > end:
            raise TableError("truncated field name")
        name = bytes(view[pos + 1 : name_end])
        kind = view[name_end]
        stop = _value_end(view, name_end + 1, kind, end)
        yield name, kind, view[name_end + 1 : stop]
        pos = stop


def long_string(value: memoryview) -> bytes:
    """The bytes of an 'S' value (length prefix dropped)."""
    return bytes(value[4:])


def encode_long_strings(entries: dict[bytes, bytes]) -> bytes:
    """A table (without its length prefix) of 'S' entries: the AMQPLAIN response."""
    out = bytearray()
    for name, value in entries.items():
        out += bytes([len(name)]) + name + b"S" + _U32.pack(len(value)) + value
    return bytes(out)
