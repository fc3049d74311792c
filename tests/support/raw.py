"""The raw client on a blocking socket, for tests that need exact frames (its frames:
``support.wire``, which the benchmarks' asyncio driver shares).

Real clients (pika, aio-pika) hide frames the tests need to observe (an unexpected Basic.Ack, the
exact delivery tag, the reply code of a Connection.Close during the handshake) and cannot stop in
the middle of a message.  This client can.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from pamqp import commands
from pamqp import frame as pframe
from pamqp import header as pheader
from pamqp import heartbeat as pheartbeat

from support import wire
from support.wire import FRAME_END, PROTOCOL_HEADER


class RawClosed(Exception):
    """The peer closed the TCP connection."""


class RawConnectionClose(Exception):
    """The peer sent Connection.Close."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(reply_code, reply_text)
        self.reply_code = reply_code
        self.reply_text = reply_text


class RawAMQP:
    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.frame_max = 131072
        self.channel_max = 0
        self.heartbeat = 0
        self.server_properties: dict[str, Any] = {}
        self.mechanisms = ""
        self.last_frame_size = 0

    # -- low level -------------------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, channel: int, value: Any) -> None:
        self.sock.sendall(pframe.marshal(value, channel))

    def _fill(self, n: int, deadline: float) -> None:
        while len(self.buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out waiting for {n} bytes, have {len(self.buf)}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError as exc:
                raise TimeoutError("timed out waiting for data") from exc
            except ConnectionResetError as exc:
                raise RawClosed("connection reset") from exc
            if not chunk:
                raise RawClosed(f"peer closed the connection ({len(self.buf)} bytes unread)")
            self.buf += chunk

    def read_frame(self, timeout: float = 5.0) -> tuple[int, Any]:
        """Return (channel, frame value). Raises TimeoutError, RawClosed."""
        deadline = time.monotonic() + timeout
        self._fill(7, deadline)
        if self.buf.startswith(b"AMQP"):
            self._fill(8, deadline)
            hdr, self.buf = self.buf[:8], self.buf[8:]
            return -1, hdr
        ftype, _channel, size = wire.HEADER.unpack_from(self.buf, 0)
        self._fill(7 + size + 1, deadline)
        raw = self.buf[: 7 + size + 1]
        self.buf = self.buf[7 + size + 1 :]
        if raw[-1] != FRAME_END:
            raise AssertionError(f"bad frame end byte {raw[-1]:#x} (type {ftype}, size {size})")
        self.last_frame_size = len(raw)
        _, ch, value = pframe.unmarshal(raw)
        return ch, value

    def read_until(self, predicate, timeout: float = 5.0, skip_heartbeats: bool = True):
        """Read frames until predicate(channel, value) is true; return (channel, value, skipped).

        A Connection.Close raises RawConnectionClose (after answering CloseOk) unless the
        predicate accepts it.
        """
        deadline = time.monotonic() + timeout
        skipped = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching frame; got {skipped!r}")
            ch, value = self.read_frame(remaining)
            if skip_heartbeats and isinstance(value, pheartbeat.Heartbeat):
                continue
            if predicate(ch, value):
                return ch, value, skipped
            if isinstance(value, commands.Connection.Close):
                try:
                    self.send(0, commands.Connection.CloseOk())
                except OSError:
                    pass
                raise RawConnectionClose(value.reply_code, value.reply_text)
            skipped.append((ch, value))

    def expect(self, cls, channel: int | None = None, timeout: float = 5.0):
        _ch, value, _skipped = self.read_until(
            lambda c, v: isinstance(v, cls) and (channel is None or c == channel), timeout
        )
        return value

    def frames_for(self, duration: float) -> list[tuple[int, Any]]:
        """Collect every frame that arrives within `duration` seconds (heartbeats included)."""
        out = []
        deadline = time.monotonic() + duration
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return out
            try:
                out.append(self.read_frame(remaining))
            except TimeoutError:
                return out

    # -- handshake ------------------------------------------------------------------------
    def handshake(
        self,
        user: str = "guest",
        password: str = "guest",
        vhost: str = "/",
        heartbeat: int = 0,
        frame_max: int = 131072,
        channel_max: int = 2047,
        connection_name: str | None = None,
        mechanism: str = "PLAIN",
        timeout: float = 10.0,
        response: bytes | None = None,
        vhost_bytes: bytes | None = None,
    ) -> None:
        """Full connection handshake. Raises RawConnectionClose if the server refuses.

        ``response`` sends these exact bytes as the SASL response (default: built from
        ``user`` and ``password`` for ``mechanism``); ``vhost_bytes`` likewise for the vhost."""
        self.send_raw(PROTOCOL_HEADER)
        start = self.expect(commands.Connection.Start, 0, timeout)
        self.server_properties = start.server_properties
        self.mechanisms = start.mechanisms
        props: dict[str, Any] = {
            "product": "amqproxy-integration-tests",
            "capabilities": wire.CAPABILITIES,
        }
        if connection_name:
            props["connection_name"] = connection_name
        self.send_raw(wire.start_ok(user, password, mechanism, props, response))
        tune = self.expect(commands.Connection.Tune, 0, timeout)
        self.channel_max = min(channel_max, tune.channel_max or channel_max)
        self.frame_max = min(frame_max, tune.frame_max or frame_max)
        self.heartbeat = heartbeat
        self.send_raw(wire.tune_ok(self.channel_max, self.frame_max, heartbeat))
        self.send_raw(wire.open_vhost(vhost.encode() if vhost_bytes is None else vhost_bytes))
        self.expect(commands.Connection.OpenOk, 0, timeout)

    def open_channel(self, channel: int = 1, timeout: float = 5.0) -> None:
        self.send(channel, commands.Channel.Open())
        self.expect(commands.Channel.OpenOk, channel, timeout)

    def rpc(self, channel: int, method: Any, reply_cls, timeout: float = 5.0):
        self.send(channel, method)
        return self.expect(reply_cls, channel, timeout)

    # -- content ---------------------------------------------------------------------------
    def content_frames(
        self,
        channel: int,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: commands.Basic.Properties | None = None,
        mandatory: bool = False,
        declared_size: int | None = None,
    ) -> bytes:
        return wire.content(
            channel, exchange, routing_key, body, self.frame_max, properties, mandatory,
            declared_size,
        )  # fmt: skip

    def publish(self, channel: int, exchange: str, routing_key: str, body: bytes, **kw) -> None:
        self.send_raw(self.content_frames(channel, exchange, routing_key, body, **kw))

    def close(self, timeout: float = 3.0) -> None:
        """Polite Connection.Close, then close the socket."""
        try:
            self.send(0, commands.Connection.Close(200, "bye", 0, 0))
            self.read_until(lambda c, v: isinstance(v, commands.Connection.CloseOk), timeout)
        except (OSError, TimeoutError, RawClosed, RawConnectionClose):
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def is_heartbeat(value: Any) -> bool:
    return isinstance(value, pheartbeat.Heartbeat)


def is_protocol_header(value: Any) -> bool:
    return isinstance(value, bytes | pheader.ProtocolHeader)
