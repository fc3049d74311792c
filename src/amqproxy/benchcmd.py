"""``amqproxy bench URL``: is the proxy worth deploying in front of this broker?

It runs the short-lived publisher pattern (connect, open a channel, publish 100 bytes, close
the channel, close the connection) N times directly against the user's broker and N times
through a proxy started in this process, interleaved, on a queue of its own (exclusive to the
bench's own connection, so the broker deletes it even if the bench is killed), and prints both
with the gain and the round-trip time to the broker: the distance the proxy hides.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import ssl
import statistics
import struct
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from pamqp import body, commands, frame, header, heartbeat

from amqproxy import __version__
from amqproxy.config import load

T = TypeVar("T")
BODY = b"amqproxy bench ".ljust(100, b".")
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


class BenchError(Exception):
    """Something the user must hear about: the broker refused us, a cycle failed."""


# ---- the broker's address ----------------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    """Where and as whom: the parts of the URL, the TLS context for amqps://."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    vhost: str
    tls: bool
    ca: str | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)

    @classmethod
    def from_url(cls, url: str, ca: str | None) -> Broker:
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise BenchError(f"{url!r} is not an amqp:// or amqps:// URL with a host")
        tls = parts.scheme == "amqps"
        try:
            port = parts.port or (5671 if tls else 5672)
        except ValueError:
            raise BenchError(f"{url!r} has a bad port") from None
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        context = ssl.create_default_context(cafile=ca) if tls else None
        user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
        return cls(parts.hostname, port, user, password, vhost, tls, ca, context)

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def shown(self) -> str:
        """The URL without the password."""
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{self.user}@{self.netloc}/ (vhost {self.vhost!r})"


# ---- just enough AMQP 0-9-1 for the bench ------------------------------------------------------


class Client:
    """One connection with channel 1; every call waits for its reply, like a plain client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, broker: Broker, host: str, port: int, tls: bool) -> Client:
        context = broker.ssl_context if tls else None
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=host if context else None
        )
        client = cls(reader, writer)
        try:
            await client.handshake(broker)
        except BaseException:
            writer.transport.abort()
            raise
        return client

    def send(self, *frames: frame.FrameTypes, channel: int = 0) -> None:
        self.writer.write(b"".join(frame.marshal(f, channel) for f in frames))

    async def expect(self, kind: type[T]) -> T:
        """The next frame, skipping heartbeats; the broker's Close becomes a BenchError."""
        while True:
            head = await self.reader.readexactly(7)
            size = struct.unpack_from(">I", head, 3)[0]
            data = head + await self.reader.readexactly(size + 1)
            _, _channel, value = frame.unmarshal(data)
            if isinstance(value, commands.Connection.Close | commands.Channel.Close):
                what = "connection" if isinstance(value, commands.Connection.Close) else "channel"
                raise BenchError(f"the broker closed the {what}: {value.reply_text}")
            if isinstance(value, kind):
                return value
            if not isinstance(value, heartbeat.Heartbeat):
                raise BenchError(f"expected {kind.__name__}, got {type(value).__name__}")

    async def handshake(self, broker: Broker) -> None:
        self.writer.write(PROTOCOL_HEADER)
        await self.expect(commands.Connection.Start)
        response = f"\0{broker.user}\0{broker.password}"
        properties: dict[str, Any] = {
            "product": "amqproxy bench",
            "version": __version__,
            "capabilities": {"authentication_failure_close": True},
        }
        self.send(commands.Connection.StartOk(properties, "PLAIN", response))
        tune = await self.expect(commands.Connection.Tune)
        self.send(
            commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0),
            commands.Connection.Open(broker.vhost),
        )
        await self.expect(commands.Connection.OpenOk)
        self.send(commands.Channel.Open(), channel=1)
        await self.expect(commands.Channel.OpenOk)

    def publish(self, queue: str) -> None:
        self.send(
            commands.Basic.Publish(exchange="", routing_key=queue),
            header.ContentHeader(0, len(BODY), commands.Basic.Properties()),
            body.ContentBody(BODY),
            channel=1,
        )

    async def call(self, method: frame.FrameTypes, reply: type[T]) -> T:
        self.send(method, channel=1)
        return await self.expect(reply)

    async def close(self) -> None:
        await self.call(commands.Channel.Close(200, "bye", 0, 0), commands.Channel.CloseOk)
        self.send(commands.Connection.Close(200, "bye", 0, 0))
        await self.expect(commands.Connection.CloseOk)
        self.writer.close()

    def abort(self) -> None:
        self.writer.transport.abort()


async def cycle(broker: Broker, host: str, port: int, tls: bool, queue: str) -> float:
    """One connect-publish-close cycle; its wall time in ms."""
    t0 = time.perf_counter()
    client = await Client.connect(broker, host, port, tls)
    try:
        client.publish(queue)
        await client.close()
    except BaseException:
        client.abort()
        raise
    return (time.perf_counter() - t0) * 1000


# ---- the proxy, in this process ----------------------------------------------------------------


class InProcessProxy:
    """Our proxy in a thread with its own event loop, on a free loopback port, quiet (WARNING)."""

    def __init__(self, broker: Broker) -> None:
        self.port = free_port()
        scheme = "amqps" if broker.tls else "amqp"
        overrides = {
            "upstream": f"{scheme}://{broker.netloc}",
            "listen_address": "127.0.0.1",
            "listen_port": str(self.port),
            "http_port": "0",
            "upstream_ca": broker.ca,
        }
        self.settings = load(None, {}, overrides)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.proxy: Any = None
        self.thread = threading.Thread(target=self._run, name="amqproxy", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        from amqproxy.server import Proxy

        self.loop = thread_loop()
        asyncio.set_event_loop(self.loop)
        self.proxy = Proxy(self.settings)
        try:
            self.loop.run_until_complete(self.proxy.run())
        except BaseException as exc:  # reported by start()
            self.error = exc
        finally:
            # what asyncio.run does: the proxy's housekeeping tasks end with the loop
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.close()

    def start(self, timeout: float = 15.0) -> InProcessProxy:
        logging.getLogger("amqproxy").setLevel(logging.WARNING)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.thread.is_alive():
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return self
            time.sleep(0.02)
        raise BenchError(f"the in-process proxy did not start: {self.error!r}")

    def stop(self, timeout: float = 20.0) -> None:
        """Drain as on SIGTERM: what the proxy answered for is delivered before it stops."""
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.proxy.stop)
        self.thread.join(timeout)


def thread_loop() -> asyncio.AbstractEventLoop:
    """An event loop (uvloop when installed) for a thread other than the main one: the proxy
    asks for SIGTERM/SIGINT handlers, which only the main thread may have, and here signals
    are the command's business, so the request is ignored."""
    try:
        import uvloop
    except ImportError:

        class Loop(asyncio.SelectorEventLoop):
            def add_signal_handler(  # type: ignore[override]
                self, sig: int, callback: Callable[..., object], *args: Any
            ) -> None:
                pass

        return Loop()

    class UvLoop(uvloop.Loop):
        def add_signal_handler(  # type: ignore[override]
            self, sig: int, callback: Callable[..., object], *args: Any
        ) -> None:
            pass

    loop: asyncio.AbstractEventLoop = UvLoop()
    return loop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the measurement ---------------------------------------------------------------------------


async def tcp_connect_ms(broker: Broker, n: int = 5) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        _, writer = await asyncio.open_connection(broker.host, broker.port)
        samples.append((time.perf_counter() - t0) * 1000)
        writer.close()
    return statistics.median(samples)


async def round_trip_ms(admin: Client, n: int = 10) -> float:
    """A synchronous call the broker answers at once (basic.qos): one round trip."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await admin.call(commands.Basic.Qos(0, 0, False), commands.Basic.QosOk)
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


async def cycles(
    broker: Broker, proxy_port: int, queue: str, n: int, max_seconds: float, progress: Progress
) -> tuple[list[float], list[float]]:
    """n cycles each way, interleaved (direct first, then proxied first, ...), after one
    warm-up each; stops early once `max_seconds` have passed and 5 of each are done."""
    far = (broker.host, broker.port, broker.tls)
    near = ("127.0.0.1", proxy_port, False)
    for where in (far, near):
        await asyncio.wait_for(cycle(broker, *where, queue), 30)
    direct: list[float] = []
    proxied: list[float] = []
    deadline = time.monotonic() + max_seconds
    for i in range(n):
        order = [(far, direct), (near, proxied)]
        for where, samples in order if i % 2 == 0 else order[::-1]:
            samples.append(await asyncio.wait_for(cycle(broker, *where, queue), 30))
        progress(i + 1, n)
        if time.monotonic() > deadline and i >= 4:
            break
    return direct, proxied


async def settled_count(admin: Client, queue: str, expect: int, within: float = 10.0) -> int:
    """Messages in the queue once they reach `expect` or stop changing for a second."""
    deadline = time.monotonic() + within
    last, since = -1, time.monotonic()
    while True:
        declare = commands.Queue.Declare(queue=queue, passive=True)
        count = (await admin.call(declare, commands.Queue.DeclareOk)).message_count or 0
        if count == expect or time.monotonic() > deadline or time.monotonic() - since > 1:
            return count
        if count != last:
            last, since = count, time.monotonic()
        await asyncio.sleep(0.05)


async def bench(broker: Broker, n: int, max_seconds: float, progress: Progress) -> dict[str, Any]:
    """Everything, with the queue deleted at the end (and by the broker if we die: it is
    exclusive to the admin connection)."""
    result: dict[str, Any] = {"broker": broker.shown, "cycles_asked": n}
    result["tcp_connect_ms"] = await tcp_connect_ms(broker)
    admin = await Client.connect(broker, broker.host, broker.port, broker.tls)
    queue = f"amqproxy-bench-{uuid.uuid4().hex[:8]}"
    try:
        declare = commands.Queue.Declare(queue=queue, exclusive=True)
        await admin.call(declare, commands.Queue.DeclareOk)
        result["rtt_ms"] = await round_trip_ms(admin)
        proxy = await asyncio.to_thread(InProcessProxy(broker).start)
        try:
            direct, proxied = await cycles(broker, proxy.port, queue, n, max_seconds, progress)
        finally:
            progress.clear()
            await asyncio.to_thread(proxy.stop)  # delivers what it answered for
        published = len(direct) + len(proxied) + 2  # and the two warm-ups
        result.update(direct=stats(direct), proxied=stats(proxied), published=published)
        result["speedup"] = result["direct"]["mean_ms"] / result["proxied"]["mean_ms"]
        result["in_queue"] = await settled_count(admin, queue, published)
        await admin.call(commands.Queue.Delete(queue=queue), commands.Queue.DeleteOk)
        result.update(queue=queue, queue_deleted=True)
        await admin.close()
    except BaseException:
        admin.abort()
        raise
    return result


def stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    mean = statistics.fmean(ordered)
    return {
        "n": len(ordered),
        "mean_ms": mean,
        "p50_ms": ordered[len(ordered) // 2],
        "p99_ms": ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))],
        "min_ms": ordered[0],
        "max_ms": ordered[-1],
        "cycles_per_s": 1000 / mean,
    }


# ---- output ------------------------------------------------------------------------------------


class Progress:
    """A one-line bar on stderr while the cycles run (only on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, done: int, total: int) -> None:
        if self.enabled:
            filled = 30 * done // total
            bar = "#" * filled + "." * (30 - filled)
            sys.stderr.write(f"\r  [{bar}] {done}/{total} cycles each way")
            sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()


def render(r: dict[str, Any]) -> str:
    d, p = r["direct"], r["proxied"]
    lines = [
        f"amqproxy bench: {r['broker']}",
        f"round trip to the broker: {r['rtt_ms']:.2f} ms (basic.qos, median of 10); "
        f"TCP connect {r['tcp_connect_ms']:.2f} ms",
        f"{d['n']} connect-publish-close cycles each way, interleaved, after one warm-up:",
        "",
        f"  {'':18} {'mean ms':>9} {'p50 ms':>9} {'p99 ms':>9} {'cycles/s':>9}",
    ]
    for name, s in (("direct", d), ("through amqproxy", p)):
        lines.append(
            f"  {name:18} {s['mean_ms']:9.2f} {s['p50_ms']:9.2f} {s['p99_ms']:9.2f} "
            f"{s['cycles_per_s']:9.0f}"
        )
    lines += [
        "",
        f"gain: {r['speedup']:.1f} x as many cycles per second through the proxy "
        f"({d['mean_ms']:.2f} -> {p['mean_ms']:.2f} ms per cycle)",
        f"messages: {r['published']} published, {r['in_queue']} in the queue; "
        f"queue {r['queue']} deleted",
    ]
    return "\n".join(lines)


def run(main: Awaitable[T]) -> T:
    """uvloop when installed, like the proxy itself."""

    async def wrapped() -> T:
        return await main

    try:
        import uvloop
    except ImportError:
        return asyncio.run(wrapped())
    result: T = uvloop.run(wrapped())
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="amqproxy bench",
        description="Connect, publish 100 bytes and close, N times directly and N times "
        "through an amqproxy started in this process; print both, the gain and the round trip "
        "to the broker. Uses a queue of its own, deleted at the end.",
    )
    parser.add_argument("url", help="the broker: amqp[s]://user:password@host[:port][/vhost]")
    parser.add_argument("-n", "--cycles", type=int, default=100, help="each way (default 100)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="stop sooner once this long has passed (at least 5 cycles each; default 60)",
    )
    parser.add_argument("--ca", help="CA bundle to verify an amqps:// broker")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    progress = Progress(not args.no_progress and sys.stderr.isatty())
    try:
        broker = Broker.from_url(args.url, args.ca)
        result = run(bench(broker, args.cycles, args.max_seconds, progress))
    except (BenchError, OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        progress.clear()
        print(f"amqproxy bench: {describe(exc)}", file=sys.stderr)
        return 1
    result["amqproxy_version"] = __version__
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the broker closed the connection (wrong credentials or vhost?)"
    if isinstance(exc, TimeoutError):
        return "no answer within 30 s"
    return str(exc) or type(exc).__name__
