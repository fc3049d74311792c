"""The raw AMQP 0-9-1 client driven by asyncio, for the throughput, concurrency and memory
scenarios (and the load tests); its frames are ``support.wire``'s, which the byte-level tests'
blocking driver (``support.raw``) shares.

pika costs tens of microseconds per message and would be the bottleneck in S2-S4, so this client
speaks the wire protocol directly on an ``asyncio.Protocol``: pamqp marshals the few methods it
sends (once, ahead of time), and incoming frames are walked by header without full decoding.
It behaves like a plain client: it waits for every synchronous reply before the next request.

Message bodies are 100 bytes: a 20-digit decimal id, then padding; consumers return the ids so
the runner can check that nothing was lost or duplicated.

CLI (used by the runner to spread S3 loops over processes)::

    python bench/fastamqp.py s3 --port 5672 --queue q --loops 50 --duration 5 --id-base 0
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import ssl
import struct
import sys
import time
from collections import deque
from typing import Any

from pamqp import commands

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from support import wire
from support.wire import PROTOCOL_HEADER

BODY_SIZE = 100
_HDR = wire.HEADER
_CM = wire.METHOD_ID


def body_for(msg_id: int) -> bytes:
    """100-byte body that carries its id in the first 20 bytes."""
    return b"%020d" % msg_id + b"x" * (BODY_SIZE - 20)


def id_of(body: bytes | memoryview) -> int:
    return int(bytes(body[:20]))


_method = wire.method


@functools.lru_cache(maxsize=64)
def _handshake_frames(
    user: str, password: str, vhost: str, channel_max: int, frame_max: int
) -> tuple[bytes, bytes]:
    """StartOk, and TuneOk + Open: marshalled once per parameter set (pamqp is not cheap)."""
    properties = {
        "product": "amqproxy-bench",
        "capabilities": {"publisher_confirms": True, "basic.nack": True},
    }
    start_ok = wire.start_ok(user, password, "PLAIN", properties)
    tune_open = wire.tune_ok(channel_max, frame_max, 0) + wire.open_vhost(vhost.encode())
    return start_ok, tune_open


@functools.lru_cache(maxsize=16)
def _const(name: str, ch: int) -> bytes:
    """Frames every cycle sends, marshalled once."""
    cmd = {
        "channel.open": commands.Channel.Open(),
        "channel.close": commands.Channel.Close(200, "bye", 0, 0),
        "connection.close": commands.Connection.Close(200, "bye", 0, 0),
    }[name]
    return _method(ch, cmd)


def _publish_prefix(ch: int, routing_key: str, exchange: str = "") -> bytes:
    """Basic.Publish + content header for a BODY_SIZE body (identical for every message)."""
    method = _method(ch, commands.Basic.Publish(exchange=exchange, routing_key=routing_key))
    header_payload = struct.pack(">HHQH", 60, 0, BODY_SIZE, 0)
    header = wire.frame(2, ch, header_payload)
    return method + header


@functools.lru_cache(maxsize=64)
def _cached_prefix(queue: str) -> bytes:
    return _publish_prefix(1, queue)


_body_frame = wire.body_frame


def _ack_frame(ch: int, tag: int) -> bytes:
    return wire.frame(1, ch, struct.pack(">HHQB", 60, 80, tag, 0))


def build_publish_frames(queue: str, ids: list[int], ch: int = 1) -> list[bytes]:
    """Wire bytes of one publish per id (built before timing starts)."""
    prefix = _publish_prefix(ch, queue)
    return [prefix + _body_frame(ch, body_for(i)) for i in ids]


class AMQPError(Exception):
    """The peer closed the connection or channel, or answered unexpectedly."""


class FastConn(asyncio.Protocol):
    """One AMQP connection with channel 1; see module doc."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.methods: deque[tuple[int, int, int, bytes]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.drain_waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.closed_exc: Exception | None = None
        self.frame_max = 131072
        # consume / confirm state
        self.consuming = False
        self.no_ack = True
        self.ids: list[int] = []
        self.expect_n = 0
        self.consume_done: asyncio.Future[None] | None = None
        self._in_deliver = False
        self.confirm_acked: bytearray | None = None
        self.confirm_low = 0
        self.confirm_count = 0
        self.confirm_nacks = 0
        self.confirm_base = 0  # confirms of earlier publish_confirmed calls
        self.confirm_waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        n = len(buf)
        pos = 0
        acks: list[bytes] | None = [] if (self.consuming and not self.no_ack) else None
        while n - pos >= 7:
            ftype, ch, size = _HDR.unpack_from(buf, pos)
            end = pos + 7 + size
            if end >= n:
                break
            if ftype == 1:
                cls, meth = _CM.unpack_from(buf, pos + 7)
                if cls == 60 and meth == 60:  # Basic.Deliver
                    self._in_deliver = True
                    if acks is not None:
                        # consumer_tag shortstr, then delivery_tag u64
                        tl = buf[pos + 11]
                        (tag,) = struct.unpack_from(">Q", buf, pos + 12 + tl)
                        acks.append(_ack_frame(ch, tag))
                elif cls == 60 and meth == 80 and self.confirm_acked is not None:
                    tag, multiple = struct.unpack_from(">QB", buf, pos + 11)
                    self._on_confirm(tag, bool(multiple & 1))
                elif cls == 60 and meth == 120 and self.confirm_acked is not None:
                    tag, flags = struct.unpack_from(">QB", buf, pos + 11)
                    self.confirm_nacks += 1
                    self._on_confirm(tag, bool(flags & 1))
                else:
                    self.methods.append((ch, cls, meth, buf[pos + 7 : end]))
                    if cls in (10, 20) and meth == 40:  # peer closes: reply and fail
                        self._peer_close(ch, cls, buf[pos + 7 : end])
                    self._wake()
            elif ftype == 3 and self._in_deliver:
                self._in_deliver = False
                self.ids.append(int(buf[pos + 7 : pos + 27]))
                if len(self.ids) >= self.expect_n and self.consume_done is not None:
                    if not self.consume_done.done():
                        self.consume_done.set_result(None)
            pos = end + 1
        self.buf = buf[pos:]
        if acks and self.transport is not None:
            self.transport.write(b"".join(acks))

    def _peer_close(self, ch: int, cls: int, payload: bytes) -> None:
        code = struct.unpack_from(">H", payload, 4)[0]
        tl = payload[6]
        text = payload[7 : 7 + tl].decode(errors="replace")
        self.closed_exc = AMQPError(
            f"{'connection' if cls == 10 else 'channel'} closed {code} {text}"
        )
        if self.transport is not None:
            self.transport.write(
                _method(
                    ch, commands.Connection.CloseOk() if cls == 10 else commands.Channel.CloseOk()
                )
            )
        for fut in (self.consume_done, self.confirm_waiter):
            if fut is not None and not fut.done():
                fut.set_exception(self.closed_exc)

    def _on_confirm(self, tag: int, multiple: bool) -> None:
        acked = self.confirm_acked
        assert acked is not None
        tag -= self.confirm_base  # tags of earlier publish_confirmed calls on this channel
        if multiple:
            for t in range(self.confirm_low + 1, tag + 1):
                if not acked[t]:
                    acked[t] = 1
                    self.confirm_count += 1
        elif not acked[tag]:
            acked[tag] = 1
            self.confirm_count += 1
        while self.confirm_low + 1 < len(acked) and acked[self.confirm_low + 1]:
            self.confirm_low += 1
        w = self.confirm_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed_exc is None:
            self.closed_exc = AMQPError(f"connection lost: {exc!r}")
        for fut in (self.waiter, self.drain_waiter, self.consume_done, self.confirm_waiter):
            if fut is not None and not fut.done():
                fut.set_exception(self.closed_exc)

    # -- helpers ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise self.closed_exc or AMQPError("not connected")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.paused:
            self.drain_waiter = asyncio.get_running_loop().create_future()
            await self.drain_waiter

    async def expect(self, cls: int, meth: int) -> bytes:
        """Wait for the next method frame; it must be (cls, meth)."""
        while not self.methods:
            if self.closed_exc is not None:
                raise self.closed_exc
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        ch, c, m, payload = self.methods.popleft()
        if (c, m) != (cls, meth):
            if self.closed_exc is not None:
                raise self.closed_exc
            raise AMQPError(f"expected {cls}.{meth}, got {c}.{m} on channel {ch}")
        return payload

    # -- AMQP operations -------------------------------------------------------------------

    async def handshake(self, user: str, password: str, vhost: str) -> None:
        self.write(PROTOCOL_HEADER)
        await self.expect(10, 10)
        tune_args = (user, password, vhost)
        self.write(_handshake_frames(*tune_args, 0, 0)[0])
        tune = await self.expect(10, 30)
        channel_max, frame_max, _hb = struct.unpack_from(">HIH", tune, 4)
        self.frame_max = frame_max or 131072
        self.write(_handshake_frames(*tune_args, channel_max or 2047, self.frame_max)[1])
        await self.expect(10, 41)

    async def open_channel(self, ch: int = 1) -> None:
        self.write(_const("channel.open", ch))
        await self.expect(20, 11)

    async def close_channel(self, ch: int = 1) -> None:
        self.write(_const("channel.close", ch))
        await self.expect(20, 41)

    async def close(self) -> None:
        self.write(_const("connection.close", 0))
        await self.expect(10, 51)
        assert self.transport is not None
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def declare_passive(self, queue: str, ch: int = 1) -> int:
        """Synchronous call used as a fence; returns the queue's message count."""
        self.write(_method(ch, commands.Queue.Declare(queue=queue, passive=True)))
        payload = await self.expect(50, 11)
        ql = payload[4]
        (count,) = struct.unpack_from(">I", payload, 5 + ql)
        return count

    async def publish_many(self, queue: str, ids: list[int], batch: int = 500) -> None:
        await self.publish_frames(build_publish_frames(queue, ids), batch)

    async def publish_frames(self, frames: list[bytes], batch: int = 500) -> None:
        """Write prebuilt messages in batches, honouring the transport's flow control."""
        for k in range(0, len(frames), batch):
            if self.closed_exc is not None:
                raise self.closed_exc
            self.write(b"".join(frames[k : k + batch]))
            await self.drain()

    async def confirm_select(self) -> None:
        self.write(_method(1, commands.Confirm.Select()))
        await self.expect(85, 11)

    async def publish_confirmed(self, frames: list[bytes], window: int = 100) -> int:
        """Publish prebuilt messages with at most `window` unconfirmed; returns the nacks."""
        self.confirm_acked = bytearray(len(frames) + 1)
        self.confirm_low = 0
        self.confirm_count = 0
        self.confirm_nacks = 0
        sent = 0
        loop = asyncio.get_running_loop()
        total = len(frames)
        while self.confirm_count < total:
            room = window - (sent - self.confirm_count)
            if room > 0 and sent < total:
                k = min(room, total - sent)
                self.write(b"".join(frames[sent : sent + k]))
                sent += k
                await self.drain()
            if self.confirm_count < total:
                self.confirm_waiter = loop.create_future()
                await self.confirm_waiter
        self.confirm_base += total
        return self.confirm_nacks

    async def consume(
        self, queue: str, n: int, no_ack: bool = True, prefetch: int = 0, within: float = 120
    ) -> list[int]:
        """Consume until `n` deliveries arrived; returns their ids."""
        if prefetch:
            self.write(_method(1, commands.Basic.Qos(prefetch_count=prefetch)))
            await self.expect(60, 11)
        self.ids = []
        self.expect_n = n
        self.no_ack = no_ack
        self.consuming = True
        self.consume_done = asyncio.get_running_loop().create_future()
        self.write(
            _method(1, commands.Basic.Consume(queue=queue, consumer_tag="bench", no_ack=no_ack))
        )
        await self.expect(60, 21)
        if n:
            await asyncio.wait_for(self.consume_done, within)
        self.consuming = False
        self.write(_method(1, commands.Basic.Cancel(consumer_tag="bench")))
        await self.expect(60, 31)
        return self.ids


async def connect(
    host: str,
    port: int,
    user: str = "guest",
    password: str = "guest",
    vhost: str = "/",
    ssl_ctx: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    channel: bool = True,
) -> FastConn:
    """Open a connection (and channel 1 unless told otherwise)."""
    loop = asyncio.get_running_loop()
    kw: dict[str, Any] = {}
    if ssl_ctx is not None:
        kw = {"ssl": ssl_ctx, "server_hostname": server_hostname or "localhost"}
    _, conn = await loop.create_connection(FastConn, host, port, **kw)
    try:
        await conn.handshake(user, password, vhost)
        if channel:
            await conn.open_channel()
    except BaseException:
        conn.abort()
        raise
    return conn


async def short_cycle(host: str, port: int, queue: str, msg_id: int, **kw: Any) -> None:
    """One S1/S3 cycle: connect, open channel, publish, close channel, close connection."""
    conn = await connect(host, port, **kw)
    try:
        conn.write(_cached_prefix(queue) + _body_frame(1, body_for(msg_id)))
        await conn.close_channel()
        await conn.close()
    except BaseException:
        conn.abort()
        raise


async def s3_loops(
    host: str, port: int, queue: str, loops: int, duration: float, id_base: int
) -> dict[str, Any]:
    """`loops` concurrent short-lived publishers for `duration` seconds."""
    deadline = time.monotonic() + duration
    lat: list[float] = []
    ids: list[int] = []
    errors: list[str] = []
    maybe: list[int] = []

    async def one(k: int) -> None:
        j = 0
        while time.monotonic() < deadline:
            msg_id = id_base + k * 1_000_000 + j
            j += 1
            t0 = time.perf_counter()
            try:
                await short_cycle(host, port, queue, msg_id)
            except Exception as e:
                errors.append(repr(e)[:200])
                maybe.append(msg_id)
                await asyncio.sleep(0.01)
                continue
            lat.append((time.perf_counter() - t0) * 1000)
            ids.append(msg_id)

    t0 = time.monotonic()
    c0 = time.process_time()
    await asyncio.gather(*(one(k) for k in range(loops)))
    return {
        "elapsed_s": time.monotonic() - t0,
        "client_cpu_s": time.process_time() - c0,
        "lat_ms": lat,
        "ids": ids,
        "maybe_ids": maybe,
        "errors": errors[:20],
        "n_errors": len(errors),
    }


async def drain_ids(
    host: str, port: int, queue: str, expected: int, within: float = 60, **kw: Any
) -> list[int]:
    """Consume everything in `queue` (no-ack) and return the ids; used for verification.
    `kw`: user, password, vhost for connect()."""
    conn = await connect(host, port, **kw)
    try:
        count = await conn.declare_passive(queue)
        ids = await conn.consume(queue, count, no_ack=True, within=within) if count else []
        rest = await conn.declare_passive(queue)
        if rest:
            ids += await conn.consume(queue, rest, no_ack=True, within=within)
        await conn.close_channel()
        await conn.close()
        return ids
    except BaseException:
        conn.abort()
        raise


def run(coro: Any) -> Any:
    """asyncio.run with uvloop when installed."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fast AMQP client for the bench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s3 = sub.add_parser("s3", help="concurrent short-lived publisher loops; prints JSON")
    s3.add_argument("--host", default="127.0.0.1")
    s3.add_argument("--port", type=int, default=5672)
    s3.add_argument("--queue", required=True)
    s3.add_argument("--loops", type=int, default=50)
    s3.add_argument("--duration", type=float, default=15.0)
    s3.add_argument("--id-base", type=int, default=0)
    s3.add_argument("--start-at", type=float, default=0.0, help="time.time() to start at")
    args = ap.parse_args(argv)
    if args.start_at:
        time.sleep(max(0.0, args.start_at - time.time()))
    res = run(s3_loops(args.host, args.port, args.queue, args.loops, args.duration, args.id_base))
    json.dump(res, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
