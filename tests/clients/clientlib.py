"""Shared helpers for the real-client suite (tests/clients).

The proxy factory, throwaway tenants, queues, metrics and the raw client come from the tests'
``support`` package; on top of them this module has what the client tests share:

* an exact AMQP field-table codec that keeps type tags (``("b", -5)``), used to publish a
  reference message whose header table holds every value type with explicit tags, and to read the
  raw content header of a message straight from the broker, so a test can assert which tag each
  client put on the wire and that it arrived byte for byte;
* runners for the PHP and Node driver scripts (subprocess, JSON on stdout, always a timeout);
* the expected basic properties.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

from pamqp import commands  # noqa: E402
from pamqp import frame as pframe  # noqa: E402
from support import (  # noqa: E402, F401 - re-exported for the client tests
    BROKER_HOST,
    BROKER_PORT,
    CLIENT_CONNECTIONS,
    UPSTREAM_CONNECTIONS,
    UPSTREAM_CONNECTS,
    Proxy,
    Tenant,
    direct,
    drain,
    queue_counts,
    reply_code_of,
    wait_for,
)
from support.raw import RawAMQP, RawConnectionClose  # noqa: E402, F401

FRAME_MAX = 131072  # what the broker (and so the proxy) offers; every client here accepts it
MIB = 1024 * 1024
# bodies every client must carry unchanged: empty, one byte, exactly one body frame, one byte
# more than a frame, and multi-frame bodies
BODY_SIZES = [0, 1, FRAME_MAX - 8, FRAME_MAX - 7, MIB, 10 * MIB]


def body_of(size: int, seed: int = 0) -> bytes:
    """A deterministic body whose bytes depend on the position (catches reordered frames)."""
    if size == 0:
        return b""
    block = bytes((i * 7 + seed) & 0xFF for i in range(251))  # 251: prime, not a frame divisor
    return (block * (size // len(block) + 1))[:size]


# ---------------------------------------------------------------------------------------------
# exact field tables
# ---------------------------------------------------------------------------------------------
def _sstr(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">B", len(b)) + b


# Field types of a fixed size: tag -> struct format.
_FIXED = {"b": ">b", "B": ">B", "s": ">h", "u": ">H", "I": ">i", "i": ">I", "l": ">q",
          "f": ">f", "d": ">d", "T": ">Q"}  # fmt: skip


def encode_value(tv: tuple[str, Any]) -> bytes:
    tag, v = tv
    t = tag.encode()
    if tag in _FIXED:
        return t + struct.pack(_FIXED[tag], v)
    if tag == "t":
        return t + struct.pack(">B", 1 if v else 0)
    if tag == "D":
        places, digits = v
        return t + struct.pack(">Bi", places, digits)
    if tag in ("S", "x"):
        b = v.encode() if isinstance(v, str) else v
        return t + struct.pack(">I", len(b)) + b
    if tag == "F":
        return t + encode_table(v)
    if tag == "A":
        inner = b"".join(encode_value(x) for x in v)
        return t + struct.pack(">I", len(inner)) + inner
    if tag == "V":
        return t
    raise ValueError(f"unknown tag {tag!r}")


def encode_table(table: dict[str, tuple[str, Any]]) -> bytes:
    inner = b"".join(_sstr(k) + encode_value(v) for k, v in table.items())
    return struct.pack(">I", len(inner)) + inner


def _decode_value(data: bytes, pos: int) -> tuple[tuple[str, Any], int]:
    tag = chr(data[pos])
    pos += 1
    fixed = {
        "t": ">B",
        "b": ">b",
        "B": ">B",
        "s": ">h",
        "u": ">H",
        "I": ">i",
        "i": ">I",
        "l": ">q",
        "L": ">Q",
        "f": ">f",
        "d": ">d",
        "T": ">Q",
    }
    if tag in fixed:
        fmt = fixed[tag]
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return (tag, bool(v) if tag == "t" else v), pos
    if tag == "D":
        places, digits = struct.unpack_from(">Bi", data, pos)
        return (tag, (places, digits)), pos + 5
    if tag in "Sx":
        (n,) = struct.unpack_from(">I", data, pos)
        raw = data[pos + 4 : pos + 4 + n]
        return (tag, raw.decode() if tag == "S" else raw), pos + 4 + n
    if tag == "F":
        table, pos = decode_table(data, pos)
        return (tag, table), pos
    if tag == "A":
        (n,) = struct.unpack_from(">I", data, pos)
        end = pos + 4 + n
        pos += 4
        items = []
        while pos < end:
            item, pos = _decode_value(data, pos)
            items.append(item)
        return (tag, items), pos
    if tag == "V":
        return (tag, None), pos
    raise ValueError(f"unknown field tag {tag!r} at {pos - 1}")


def decode_table(data: bytes, pos: int = 0) -> tuple[dict[str, tuple[str, Any]], int]:
    (n,) = struct.unpack_from(">I", data, pos)
    end = pos + 4 + n
    pos += 4
    out: dict[str, tuple[str, Any]] = {}
    while pos < end:
        klen = data[pos]
        key = data[pos + 1 : pos + 1 + klen].decode()
        pos += 1 + klen
        out[key], pos = _decode_value(data, pos)
    return out, pos


# Basic properties in wire order: (name, flag bit, kind)
PROPERTY_FIELDS = [
    ("content_type", 15, "shortstr"),
    ("content_encoding", 14, "shortstr"),
    ("headers", 13, "table"),
    ("delivery_mode", 12, "octet"),
    ("priority", 11, "octet"),
    ("correlation_id", 10, "shortstr"),
    ("reply_to", 9, "shortstr"),
    ("expiration", 8, "shortstr"),
    ("message_id", 7, "shortstr"),
    ("timestamp", 6, "timestamp"),
    ("type", 5, "shortstr"),
    ("user_id", 4, "shortstr"),
    ("app_id", 3, "shortstr"),
]


def encode_properties(props: dict[str, Any]) -> bytes:
    """Property flags + property list; ``headers`` is a typed table {key: (tag, value)}."""
    flags = 0
    out = b""
    for name, bit, kind in PROPERTY_FIELDS:
        if name not in props:
            continue
        flags |= 1 << bit
        v = props[name]
        if kind == "shortstr":
            out += _sstr(v)
        elif kind == "octet":
            out += struct.pack(">B", v)
        elif kind == "timestamp":
            out += struct.pack(">Q", v)
        else:
            out += encode_table(v)
    return struct.pack(">H", flags) + out


def decode_properties(data: bytes) -> dict[str, Any]:
    (flags,) = struct.unpack_from(">H", data, 0)
    assert not flags & 1, "continuation property flags are not used by 0-9-1"
    pos = 2
    out: dict[str, Any] = {}
    for name, bit, kind in PROPERTY_FIELDS:
        if not flags & (1 << bit):
            continue
        if kind == "shortstr":
            n = data[pos]
            out[name] = data[pos + 1 : pos + 1 + n].decode()
            pos += 1 + n
        elif kind == "octet":
            out[name] = data[pos]
            pos += 1
        elif kind == "timestamp":
            (out[name],) = struct.unpack_from(">Q", data, pos)
            pos += 8
        else:
            out[name], pos = decode_table(data, pos)
    assert pos == len(data), f"{len(data) - pos} trailing bytes after the properties"
    return out


def untyped(tv: Any) -> Any:
    """("F", {"a": ("I", 1)}) -> {"a": 1}; decimals as Decimal; for comparisons with clients."""
    if isinstance(tv, dict):
        return {k: untyped(v) for k, v in tv.items()}
    tag, v = tv
    if tag == "F":
        return {k: untyped(x) for k, x in v.items()}
    if tag == "A":
        return [untyped(x) for x in v]
    if tag == "D":
        places, digits = v
        return Decimal(digits).scaleb(-places)
    return v


# ---------------------------------------------------------------------------------------------
# the reference message
# ---------------------------------------------------------------------------------------------
REF_TIMESTAMP = 1700000000  # 2023-11-14T22:13:20Z


def reference_headers(short_int: bool = True) -> dict[str, tuple[str, Any]]:
    """A header table with every field type RabbitMQ knows, tagged explicitly.

    ``short_int=False`` leaves out the signed 16-bit ``s`` (py-amqp reads ``s`` as a short
    string, as in the original 0-9-1 spec, not as RabbitMQ's short int)."""
    h: dict[str, tuple[str, Any]] = {
        "str": ("S", "hello w\u00f6rld \u2603"),
        "empty": ("S", ""),
        "i8": ("b", -5),
        "i32": ("I", -70000),
        "i64": ("l", -5000000000),
        "f32": ("f", 1.5),
        "f64": ("d", 3.25),
        "dec": ("D", (2, 12345)),
        "yes": ("t", True),
        "no": ("t", False),
        "ts": ("T", REF_TIMESTAMP),
        "table": ("F", {"k": ("S", "v"), "n": ("I", 1), "inner": ("F", {"deep": ("t", True)})}),
        "array": (
            "A",
            [("S", "a"), ("I", 2), ("t", True), ("F", {"x": ("S", "y")}), ("A", [("l", 3)])],
        ),
        "bytes": ("x", b"\x00\x01\xfe\xff"),
        "void": ("V", None),
    }
    if short_int:
        h["i16"] = ("s", -300)
    return h


def reference_properties(
    user: str, headers: dict[str, tuple[str, Any]] | None = None, **overrides: Any
) -> dict[str, Any]:
    """All 13 basic properties (user_id must be the connecting user, or the broker says 406)."""
    props: dict[str, Any] = {
        "content_type": "application/json",
        "content_encoding": "identity",
        "headers": reference_headers() if headers is None else headers,
        "delivery_mode": 2,
        "priority": 7,
        "correlation_id": "corr-42",
        "reply_to": "reply-queue",
        "expiration": "600000",
        "message_id": "msg-42",
        "timestamp": REF_TIMESTAMP,
        "type": "test.type",
        "user_id": user,
        "app_id": "amqproxy-client-tests",
    }
    props.update(overrides)
    return props


# ---------------------------------------------------------------------------------------------
# raw access to the broker (or the proxy) with the exact bytes
# ---------------------------------------------------------------------------------------------
def _raw_connect(tenant: Tenant, host: str, port: int, **kw: Any) -> Any:
    raw = RawAMQP(host, port)
    raw.handshake(tenant.user, tenant.password, tenant.vhost, **kw)
    raw.open_channel(1)
    return raw


def _read_raw_frame(raw: Any, timeout: float = 10.0) -> tuple[int, int, bytes]:
    """(type, channel, payload) of the next frame, without decoding it."""
    deadline = time.monotonic() + timeout
    raw._fill(7, deadline)
    ftype, channel, size = struct.unpack_from(">BHI", raw.buf, 0)
    raw._fill(7 + size + 1, deadline)
    payload = raw.buf[7 : 7 + size]
    assert raw.buf[7 + size] == 0xCE, "bad frame end"
    raw.buf = raw.buf[7 + size + 1 :]
    return ftype, channel, payload


@dataclass
class RawMessage:
    properties_raw: bytes  # property flags + property list, exactly as received
    properties: dict[str, Any]  # decoded, headers typed
    body: bytes
    body_frame_sizes: list[int]


def raw_publish(
    tenant: Tenant,
    queue: str,
    props: dict[str, Any],
    body: bytes = b"ref",
    host: str = BROKER_HOST,
    port: int = BROKER_PORT,
    exchange: str = "",
    count: int = 1,
) -> None:
    """Publish ``count`` copies with exactly these (typed) properties, with confirms."""
    raw = _raw_connect(tenant, host, port)
    try:
        raw.rpc(1, commands.Confirm.Select(), commands.Confirm.SelectOk)
        header = struct.pack(">HHQ", 60, 0, len(body)) + encode_properties(props)
        one = pframe.marshal(commands.Basic.Publish(exchange=exchange, routing_key=queue), 1)
        one += struct.pack(">BHI", 2, 1, len(header)) + header + b"\xce"
        step = raw.frame_max - 8
        for i in range(0, len(body), step):
            chunk = body[i : i + step]
            one += struct.pack(">BHI", 3, 1, len(chunk)) + chunk + b"\xce"
        raw.send_raw(one * count)
        acked = 0
        while acked < count:
            ack = raw.expect(commands.Basic.Ack, 1, timeout=10)
            acked = ack.delivery_tag if ack.multiple else acked + 1
    finally:
        raw.close()


def raw_get(
    tenant: Tenant,
    queue: str,
    host: str = BROKER_HOST,
    port: int = BROKER_PORT,
    frame_max: int = FRAME_MAX,
    timeout: float = 10.0,
) -> RawMessage | None:
    """Basic.Get (no_ack) one message and return its content header bytes untouched."""
    raw = _raw_connect(tenant, host, port, frame_max=frame_max)
    try:
        raw.send(1, commands.Basic.Get(queue=queue, no_ack=True))
        while True:
            ftype, _ch, payload = _read_raw_frame(raw, timeout)
            if ftype == 1:
                class_id, method_id = struct.unpack_from(">HH", payload, 0)
                if (class_id, method_id) == (60, 72):  # Get-Empty
                    return None
                if (class_id, method_id) == (60, 71):  # Get-Ok
                    break
        ftype, _ch, payload = _read_raw_frame(raw, timeout)
        assert ftype == 2, f"expected a content header, got frame type {ftype}"
        _, _, size = struct.unpack_from(">HHQ", payload, 0)
        props_raw = payload[12:]
        body = b""
        sizes = []
        while len(body) < size:
            ftype, _ch, chunk = _read_raw_frame(raw, timeout)
            assert ftype == 3, f"expected a body frame, got frame type {ftype}"
            sizes.append(len(chunk) + 8)
            body += chunk
        return RawMessage(props_raw, decode_properties(props_raw), body, sizes)
    finally:
        raw.close()


# ---------------------------------------------------------------------------------------------
# subprocess drivers (PHP, Node)
# ---------------------------------------------------------------------------------------------
NODE_DIR = HERE / "node"
PHP_DIR = HERE / "php"


class DriverError(AssertionError):
    pass


def run_driver(argv: list[str], timeout: float = 60.0, cwd: Path | None = None) -> Any:
    """Run a driver script; return the JSON it printed as its last stdout line."""
    try:
        res = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd=str(cwd) if cwd else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise DriverError(f"{argv[:3]} timed out after {timeout}s; stderr: {exc.stderr!r}") from exc
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    if res.returncode != 0 or not lines:
        raise DriverError(
            f"{' '.join(argv[:4])}... exited {res.returncode}\nstdout: {res.stdout[-3000:]}\n"
            f"stderr: {res.stderr[-3000:]}"
        )
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise DriverError(f"not JSON: {lines[-1][:2000]!r}; stderr {res.stderr[-2000:]}") from exc


def conn_args(tenant: Tenant, host: str, port: int) -> dict[str, Any]:
    return {
        "host": host,
        "port": port,
        "user": tenant.user,
        "password": tenant.password,
        "vhost": tenant.vhost,
    }


def node(command: str, args: dict[str, Any], timeout: float = 60.0) -> Any:
    exe = shutil.which("node") or "node"
    return run_driver(
        [exe, str(NODE_DIR / "driver.js"), command, json.dumps(args)], timeout=timeout, cwd=NODE_DIR
    )


def php(command: str, args: dict[str, Any], timeout: float = 60.0) -> Any:
    exe = shutil.which("php") or "php"
    return run_driver(
        [exe, str(PHP_DIR / "driver.php"), command, json.dumps(args)], timeout=timeout, cwd=PHP_DIR
    )


def tool_available(name: str) -> bool:
    return shutil.which(name) is not None


def node_available() -> bool:
    return tool_available("node") and (NODE_DIR / "node_modules" / "amqplib").is_dir()


def php_available() -> bool:
    if not tool_available("php"):
        return False
    return any(
        Path(p).is_dir()
        for p in ("/usr/share/php/PhpAmqpLib", "/usr/share/php/PhpAmqpLib/Connection")
    )


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
