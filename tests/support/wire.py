"""The frames of the raw AMQP 0-9-1 client that tests and benchmarks share.

One client, two ways to drive it: ``support.raw.RawAMQP`` on a blocking socket (exact frames,
stops mid-message, for the byte-level tests) and ``bench/fastamqp.FastConn`` on an asyncio
protocol (thousands of connections, for load). Both build and read their frames here: the
handshake they send, methods (pamqp marshals them), content split to a frame_max, and the
frame walk of what they read.
"""

from __future__ import annotations

import struct
from typing import Any

from pamqp import body as pbody
from pamqp import commands, encode
from pamqp import frame as pframe
from pamqp import header as pheader

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_END = 0xCE
FRAME_END_BYTE = b"\xce"
HEADER = struct.Struct(">BHI")  # frame type, channel, payload size
HEADER_SIZE = 7
METHOD_ID = struct.Struct(">HH")  # class id, method id: the start of a method's payload
DEFAULT_FRAME_MAX = 131072
CAPABILITIES = {
    "publisher_confirms": True,
    "basic.nack": True,
    "consumer_cancel_notify": True,
    "connection.blocked": True,
    "authentication_failure_close": True,
}


def frame(ftype: int, channel: int, payload: bytes) -> bytes:
    return HEADER.pack(ftype, channel, len(payload)) + payload + FRAME_END_BYTE


def method(channel: int, cmd: Any) -> bytes:
    """A method frame (pamqp marshals the arguments)."""
    return pframe.marshal(cmd, channel)


def body_frame(channel: int, body: bytes) -> bytes:
    return frame(3, channel, body)


def content(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    frame_max: int = DEFAULT_FRAME_MAX,
    properties: commands.Basic.Properties | None = None,
    mandatory: bool = False,
    declared_size: int | None = None,
) -> bytes:
    """Basic.Publish, its content header (``declared_size``: a body size that is not the
    body's, to test bad input) and the body in frames of at most ``frame_max``."""
    publish = commands.Basic.Publish(
        exchange=exchange, routing_key=routing_key, mandatory=mandatory
    )
    out = method(channel, publish)
    size = len(body) if declared_size is None else declared_size
    out += pframe.marshal(
        pheader.ContentHeader(0, size, properties or commands.Basic.Properties()), channel
    )
    step = frame_max - 8
    for i in range(0, len(body), step):
        out += pframe.marshal(pbody.ContentBody(body[i : i + step]), channel)
    return out


def start_ok(
    user: str,
    password: str,
    mechanism: str = "PLAIN",
    properties: dict[str, Any] | None = None,
    response: bytes | None = None,
) -> bytes:
    """Connection.StartOk, byte for byte: ``response`` sends these exact SASL bytes (default:
    built from ``user`` and ``password`` for PLAIN or AMQPLAIN)."""
    if response is None and mechanism == "PLAIN":
        response = b"\0" + user.encode() + b"\0" + password.encode()
    elif response is None:  # AMQPLAIN: a field table without its length prefix
        response = b"".join(
            bytes([len(k)]) + k + b"S" + struct.pack(">I", len(v)) + v
            for k, v in ((b"LOGIN", user.encode()), (b"PASSWORD", password.encode()))
        )
    arguments = (
        encode.field_table(properties or {"capabilities": CAPABILITIES})
        + encode.short_string(mechanism)
        + struct.pack(">I", len(response))
        + response
        + encode.short_string("en_US")
    )
    return frame(1, 0, METHOD_ID.pack(10, 11) + arguments)


def tune_ok(channel_max: int, frame_max: int, heartbeat: int) -> bytes:
    return method(0, commands.Connection.TuneOk(channel_max, frame_max, heartbeat))


def open_vhost(vhost: bytes) -> bytes:
    """Connection.Open for these exact vhost bytes."""
    return frame(1, 0, struct.pack(">HHB", 10, 40, len(vhost)) + vhost + b"\x00\x00")
