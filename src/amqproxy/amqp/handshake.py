"""Decoders for the three client methods of the connection handshake, and the encoders of
the two the proxy sends upstream with the client's exact bytes.

Every short-lived client sends them, so they are read with struct rather than through pamqp's
method objects. The client-properties table is not decoded at all: it is checked (well formed,
bounded like any table) and walked for the two things the proxy uses, the connection name and
the ``connection.blocked`` capability — no per-client copy of a client's table, however large
or deep. What a table says is kept by its bytes for the next client that sends the same one
(a few hundred small tables at most).
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from pamqp import encode

from amqproxy.amqp import constants as c
from amqproxy.amqp.frames import Buffer, FrameError
from amqproxy.amqp.methods import table_error
from amqproxy.amqp.recent import Recent
from amqproxy.amqp.table import LONG_STRING, TABLE, items, long_string

_TUNE_OK = struct.Struct(">HIH")
_FRAME_HEADER = struct.Struct(">BHI")
_U32 = struct.Struct(">I")
_TRUE = ord("t")

NOT_AMQP = "upstream is not an AMQP 0-9-1 broker"
START_FRAME_MAX = 1 << 20  # generous: Connection.Start carries the broker's properties


class StartOk(NamedTuple):
    connection_name: str  # the client's "connection_name" property, for logs
    capabilities: frozenset[bytes]  # those it announced as true
    mechanism: str
    response: bytes
    locale: str

    @property
    def wants_blocked(self) -> bool:
        return b"connection.blocked" in self.capabilities

    @property
    def wants_auth_close(self) -> bool:
        """A refused login gets Connection.Close (else RabbitMQ just drops the socket)."""
        return b"authentication_failure_close" in self.capabilities


def _short_str(payload: Buffer, pos: int) -> tuple[str, int]:
    length = payload[pos]
    end = pos + 1 + length
    if end > len(payload):
        raise IndexError
    return bytes(payload[pos + 1 : end]).decode("utf-8", "replace"), end


def _client_properties(table: memoryview) -> tuple[str, frozenset[bytes]]:
    """(connection name, the capabilities announced as true) from the properties table."""
    name, capabilities = "", set()
    for key, kind, value in items(table):
        if key == b"connection_name" and kind == LONG_STRING:
            name = long_string(value).decode("utf-8", "replace")
        elif key == b"capabilities" and kind == TABLE:
            for cap, cap_kind, cap_value in items(value[4:]):
                if cap_kind == _TRUE and cap_value[0]:
                    capabilities.add(bytes(cap))
    return name, frozenset(capabilities)


# What the client-properties tables seen last say: short-lived clients of one library send
# the same table every time (product, version, capabilities), so a repeat is one lookup instead
# of a check and a walk.
KNOWN_PROPERTIES: Recent[tuple[str, frozenset[bytes]]] = Recent(entries=256, max_size=4096)


def _checked_properties(view: memoryview, end: int) -> tuple[str, frozenset[bytes]]:
    """The client properties at ``view[8:end]``, checked (ValueError when malformed)."""
    if end > len(view):
        raise ValueError
    table = view[8:end]
    # A read-only view hashes and compares as its bytes (a writable one has no hash).
    known = KNOWN_PROPERTIES.get(table) if view.readonly else None
    if known is not None:
        return known
    if table_error(view, 8, end) is not None:
        raise ValueError
    known = _client_properties(table)
    KNOWN_PROPERTIES.keep(table, known)
    return known


def start_ok(payload: Buffer) -> StartOk:
    """Connection.StartOk: properties table, mechanism, response, locale."""
    view = memoryview(payload)
    try:
        table_size = _U32.unpack_from(view, 4)[0]
        pos = 8 + table_size
        name, capabilities = _checked_properties(view, pos)
        mechanism, pos = _short_str(view, pos)
        response_size = _U32.unpack_from(view, pos)[0]
        pos += 4
        response = bytes(view[pos : pos + response_size])
        if len(response) != response_size:
            raise IndexError
        locale, _ = _short_str(view, pos + response_size)
    except (IndexError, ValueError, struct.error):
        raise FrameError(c.SYNTAX_ERROR, "SYNTAX_ERROR - malformed connection.start-ok") from None
    return StartOk(name, capabilities, mechanism, response, locale)


def tune_ok(payload: Buffer) -> tuple[int, int, int]:
    """Connection.TuneOk: (channel_max, frame_max, heartbeat)."""
    try:
        channel_max, frame_max, heartbeat = _TUNE_OK.unpack_from(payload, 4)
    except struct.error:
        raise FrameError(c.SYNTAX_ERROR, "SYNTAX_ERROR - malformed connection.tune-ok") from None
    return channel_max, frame_max, heartbeat


def open_vhost(payload: Buffer) -> bytes:
    """Connection.Open: the virtual host, as the client's bytes."""
    length = payload[4] if len(payload) > 4 else -1
    if length < 0 or 5 + length > len(payload):
        raise FrameError(c.SYNTAX_ERROR, "SYNTAX_ERROR - malformed connection.open")
    return bytes(payload[5 : 5 + length])


def _method_frame(method_id: int, arguments: bytes) -> bytes:
    payload = _U32.pack(method_id) + arguments
    return _FRAME_HEADER.pack(c.FRAME_METHOD, 0, len(payload)) + payload + c.FRAME_END_BYTE


def encode_start_ok(properties: dict[str, Any], mechanism: str, response: bytes) -> bytes:
    """The proxy's Connection.StartOk, with the SASL response as exact bytes (pamqp would only
    take text)."""
    arguments = (
        encode.field_table(properties)
        + _short_bytes(mechanism.encode())
        + _U32.pack(len(response))
        + response
        + _short_bytes(b"en_US")
    )
    return _method_frame(c.CONNECTION_START_OK, arguments)


def encode_open(vhost: bytes) -> bytes:
    """Connection.Open for ``vhost``, as the client's bytes."""
    return _method_frame(c.CONNECTION_OPEN, _short_bytes(vhost) + b"\x00\x00")


def _short_bytes(value: bytes) -> bytes:
    return bytes([len(value)]) + value


def not_amqp(data: Buffer) -> str | None:
    """Why the first bytes a broker sent after our protocol header cannot begin its
    Connection.Start, or None when they can (or too few have come to tell).

    A 0-9-1 broker's first frame is Connection.Start on channel 0; a broker of another AMQP
    version answers with its own protocol header; anything else (HTTP, TLS, SSH) is another
    protocol, and reading it as frames would only give a confusing frame error."""
    head = bytes(data[:11])
    if not head:
        return None
    if head[0] != c.FRAME_METHOD:
        if b"AMQP".startswith(head[:4]) and len(head) < 8:
            return None
        if head.startswith(b"AMQP"):
            version = ".".join(str(octet) for octet in head[4:8])
            return f"{NOT_AMQP} (it answered with protocol header AMQP {version})"
        return f"{NOT_AMQP} (it answered {ascii(bytes(data[:24]))[1:]})"
    size = _U32.unpack_from(head, 3)[0] if len(head) >= 7 else 0
    if (
        (len(head) >= 3 and head[1:3] != b"\0\0")
        or size > START_FRAME_MAX
        or (len(head) >= 11 and _U32.unpack_from(head, 7)[0] != c.CONNECTION_START)
    ):
        return f"{NOT_AMQP} (its first frame is not Connection.Start)"
    return None
