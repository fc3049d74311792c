"""Userspace delay relay: a TCP forwarder that adds round-trip time.

`tc netem` is not available on the bench machines, so upstream latency is modelled here: every
chunk is released RTT/2 after it arrived, in order, per direction, and the client's first bytes
are held until one RTT after accept (the TCP handshake a far broker would cost).

Use it in-process (``DelayRelay(...).start()`` runs its own event loop on a thread), as a child
process (``RelayProcess``), or from the shell::

    python bench/delayrelay.py --listen 127.0.0.1:5673 --target 127.0.0.1:5672 --rtt-ms 50
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

# Bound what one direction may hold in flight before the source is paused (back-pressure).
MAX_QUEUED_BYTES = 8 * 1024 * 1024
WRITE_HIGH_WATER = 1024 * 1024


def new_event_loop() -> asyncio.AbstractEventLoop:
    """Prefer uvloop: the relay must cost far less than what it measures."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


class _Direction:
    """One direction of a relayed connection: a FIFO of (release_time, data) and one timer.

    A single timer per direction (instead of one call_at per chunk) keeps the order exact even
    when several chunks share one release time.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, hold_until: float) -> None:
        self.loop = loop
        self.delay = delay
        self.hold_until = hold_until
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.dst_paused = False
        self.src_paused = False
        self.closed = False

    def push(self, data: bytes | None) -> None:
        """Queue data (None = EOF) for release after the delay."""
        now = self.loop.time()
        release = max(now, self.hold_until) + self.delay
        if release <= now and not self.queue and self.dst is not None:
            self._emit(data)
            return
        self.queue.append((release, data))
        if data:
            self.queued_bytes += len(data)
        self._update_src_pause()
        if self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        if self.dst is None:  # upstream not connected yet: try again shortly
            self.timer = self.loop.call_later(0.001, self._flush)
            return
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if data:
                self.queued_bytes -= len(data)
            self._emit(data)
        self._update_src_pause()
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)

    def _emit(self, data: bytes | None) -> None:
        dst = self.dst
        if dst is None or dst.is_closing():
            return
        if data is None:
            if self.closed:
                return
            self.closed = True
            if dst.can_write_eof():
                dst.write_eof()
            else:
                dst.close()
        else:
            dst.write(data)

    def _update_src_pause(self) -> None:
        want_pause = self.dst_paused or self.queued_bytes > MAX_QUEUED_BYTES
        if self.src is None or self.src.is_closing():
            return
        if want_pause and not self.src_paused:
            self.src.pause_reading()
            self.src_paused = True
        elif not want_pause and self.src_paused:
            self.src.resume_reading()
            self.src_paused = False

    def set_dst_paused(self, paused: bool) -> None:
        self.dst_paused = paused
        self._update_src_pause()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()


class _Side(asyncio.Protocol):
    """Protocol for one socket of a relayed pair; reads go into the outgoing direction."""

    def __init__(self, out: _Direction, inc: _Direction, peer_close: Any) -> None:
        self.out = out  # data read here goes out this way
        self.inc = inc  # data written here comes from this direction
        self.peer_close = peer_close
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop: not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.out.src = self.transport
        self.inc.dst = self.transport

    def data_received(self, data: bytes) -> None:
        self.out.push(data)

    def eof_received(self) -> bool:
        self.out.push(None)
        return True  # keep our write side open until the delayed EOF arrives

    def pause_writing(self) -> None:
        self.inc.set_dst_paused(True)

    def resume_writing(self) -> None:
        self.inc.set_dst_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.out.push(None)
        self.peer_close()


class DelayRelay:
    """A delay relay bound to `listen`, forwarding to `target`, with round-trip time `rtt_ms`."""

    def __init__(
        self,
        target: tuple[str, int],
        rtt_ms: float,
        listen: tuple[str, int] = ("127.0.0.1", 0),
    ) -> None:
        self.target = target
        self.rtt = rtt_ms / 1000.0
        self.listen = listen
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.Transport] = set()

    async def serve(self) -> None:
        """Bind and accept; returns once listening (the server keeps running on the loop)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._server = await loop.create_server(
            self._accept_factory, self.listen[0], self.listen[1], backlog=1024, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def _accept_factory(self) -> asyncio.Protocol:
        loop = asyncio.get_running_loop()
        now = loop.time()
        half = self.rtt / 2
        # client -> broker: first bytes held until one RTT after accept, then RTT/2 each way.
        up = _Direction(loop, half, now + self.rtt)
        down = _Direction(loop, half, now)
        state: dict[str, Any] = {"closing": False}

        def close_both() -> None:
            if state["closing"]:
                return
            state["closing"] = True
            # let pending delayed data drain, then close both ends
            delay = self.rtt + 0.05

            def finish() -> None:
                for d in (up, down):
                    for t in (d.src, d.dst):
                        if t is not None and not t.is_closing():
                            t.close()
                    d.cancel()

            loop.call_later(delay, finish)

        client = _Side(up, down, close_both)

        async def connect_upstream() -> None:
            try:
                tr, _ = await loop.create_connection(
                    lambda: _Side(down, up, close_both), self.target[0], self.target[1]
                )
                self._transports.add(tr)
            except OSError:
                if client.transport is not None:
                    client.transport.close()

        task = loop.create_task(connect_upstream())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return client

    # -- background thread API -------------------------------------------------------------

    def start(self) -> DelayRelay:
        """Run the relay on its own event loop in a daemon thread; returns once listening."""

        def run() -> None:
            loop = new_event_loop()
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.serve())
            self._ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"delayrelay-{self.rtt}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("delay relay did not start")
        return self

    def stop(self) -> None:
        """Stop the thread's loop and close the listener."""
        loop = self._loop
        if loop is None or self._thread is None:
            return

        def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self._transports):
                t.close()
            loop.stop()

        loop.call_soon_threadsafe(shutdown)
        self._thread.join(5)
        self._thread = None


class RelayProcess:
    """The relay as a child process, so it does not share a GIL with the client being timed."""

    def __init__(self, target: tuple[str, int], rtt_ms: float) -> None:
        self.target = target
        self.rtt_ms = rtt_ms
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self, timeout: float = 10.0) -> RelayProcess:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--listen",
            "127.0.0.1:0",
            "--target",
            f"{self.target[0]}:{self.target[1]}",
            "--rtt-ms",
            str(self.rtt_ms),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        if not line.startswith("LISTENING") or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"delay relay failed to start: {line!r}")
        self.port = int(line.split()[1].rsplit(":", 1)[1])
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None


def calibrate(host: str, port: int, n: int = 20) -> dict[str, float]:
    """Time a synchronous basic.qos through the relay: it should take RTT + ~1 ms."""
    import pika

    params = pika.ConnectionParameters(host=host, port=port, heartbeat=0)
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            ch.basic_qos(prefetch_count=10)
            samples.append((time.perf_counter() - t0) * 1000)
        samples.sort()
        return {
            "median_ms": samples[len(samples) // 2],
            "min_ms": samples[0],
            "max_ms": samples[-1],
        }
    finally:
        conn.close()


def _hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on (0 = free)")
    ap.add_argument("--target", default="127.0.0.1:5672", help="host:port to forward to")
    ap.add_argument("--rtt-ms", type=float, default=50.0, help="round-trip time to add")
    ap.add_argument("--calibrate", action="store_true", help="measure basic.qos through it, exit")
    args = ap.parse_args(argv)

    relay = DelayRelay(_hostport(args.target), args.rtt_ms, _hostport(args.listen))
    if args.calibrate:
        relay.start()
        try:
            res = calibrate("127.0.0.1", relay.port)
        finally:
            relay.stop()
        print(
            f"rtt {args.rtt_ms} ms: basic.qos median {res['median_ms']:.2f} ms "
            f"[{res['min_ms']:.2f}-{res['max_ms']:.2f}]"
        )
        return 0

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(relay.serve())
    print(f"LISTENING 127.0.0.1:{relay.port}", flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    loop.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
