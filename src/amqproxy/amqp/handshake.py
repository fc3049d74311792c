"""Decoders for the three client methods of the connection handshake.

Every short-lived client sends them, so they are read with struct rather than through pamqp's
generic method objects; only the client-properties table goes through pamqp's table decoder, and
its result is remembered: the workers of one application send the same table bytes every time.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from pamqp import decode, encode

from amqproxy.amqp import constants as c
from amqproxy.amqp.frames import Buffer, FrameError

_TUNE_OK = struct.Struct(">HIH")
_FRAME_HEADER = struct.Struct(">BHI")
_U32 = struct.Struct(">I")

# Decoded client-properties tables by their raw bytes; shared by clients, so read-only.
_TABLES: dict[bytes, dict[str, Any]] = {}
_TABLES_MAX = 256  # distinct tables remembered (cleared when full: bounded memory)


class StartOk(NamedTuple):
    client_properties: dict[str, Any]
    mechanism: str
    response: bytes
    locale: str


def _short_str(payload: Buffer, pos: int) -> tuple[str, int]:
    length = payload[pos]
    end = pos + 1 + length
    if end > len(payload):
        raise IndexError
    return bytes(payload[pos + 1 : end]).decode("utf-8", "replace"), end


def start_ok(payload: Buffer) -> StartOk:
    """Connection.StartOk: properties table, mechanism, response, locale."""
    try:
        table_size = _U32.unpack_from(payload, 4)[0]
        pos = 8 + table_size
        raw = bytes(payload[4:pos])
        properties = _TABLES.get(raw)
        if properties is None:
            _, properties = decode.field_table(raw)
            if len(_TABLES) >= _TABLES_MAX:
                _TABLES.clear()
            _TABLES[raw] = properties
        mechanism, pos = _short_str(payload, pos)
        response_size = _U32.unpack_from(payload, pos)[0]
        pos += 4
        response = bytes(payload[pos : pos + response_size])
        if len(response) != response_size:
            raise IndexError
        locale, _ = _short_str(payload, pos + response_size)
    except (IndexError, ValueError, struct.error):
        raise FrameError(c.SYNTAX_ERROR, "SYNTAX_ERROR - malformed connection.start-ok") from None
    return StartOk(properties, mechanism, response, locale)


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
    return _FRAME_HEADER.pack(c.FRAME_METHOD, 0, len(payload)) + payload + b"\xce"


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
