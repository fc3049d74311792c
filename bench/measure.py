"""What the scenarios measure with: the workloads (fastamqp clients for S2-S6), CPU and metric
counters around a run, the loss report of the fault scenario. No scenario order lives here."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar

import fastamqp
from common import (
    BENCH_DIR,
    REPO_DIR,
    Admin,
    Proxy,
    percentile,
    rss_kib,
    run_seconds,
)

# -- process accounting ---------------------------------------------------------------------


def cpu(pid: int | None) -> float | None:
    """CPU seconds of `pid` and its live children (ns resolution), or None."""
    if not pid:
        return None
    try:
        return run_seconds(pid)
    except OSError:
        return None


class ProxyCounters:
    """A proxy's CPU and (where it exports them) upstream counters at the start of a run;
    `deltas` gives what the run cost. Empty for direct runs (no proxy)."""

    COUNTERS: ClassVar[dict[str, str]] = {
        "upstream_connects": "amqproxy_upstream_connects_total",
        "upstream_channel_opens": "amqproxy_upstream_channel_opens_total",
        "messages_replayed": "amqproxy_messages_replayed_total",
    }

    def __init__(self, proxy: Proxy | None) -> None:
        self.proxy = proxy
        self.cpu0 = cpu(proxy.pid) if proxy else None
        self.start = {k: proxy.metric(m) for k, m in self.COUNTERS.items()} if proxy else {}

    def deltas(self, n: int, elapsed: float, replay: bool = False) -> dict[str, float]:
        if self.proxy is None or not self.proxy.alive():
            return {}
        out: dict[str, float] = {}
        cpu1 = cpu(self.proxy.pid)
        if self.cpu0 is not None and cpu1 is not None and n:
            out["proxy_cpu_us_per_pub"] = (cpu1 - self.cpu0) / n * 1e6
            if elapsed:
                out["proxy_cpu_frac"] = (cpu1 - self.cpu0) / elapsed
        for key, name in self.COUNTERS.items():
            if key == "messages_replayed" and not replay:
                continue
            v0, v1 = self.start.get(key), self.proxy.metric(name)
            if v0 is not None and v1 is not None:
                out[key] = v1 - v0
        return out


class MetricSampler:
    """Polls the proxy's upstream-connection gauge during a run; keeps the maximum."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.max_upstream: float | None = None
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def start(self) -> None:
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            v = self.proxy.metric("amqproxy_upstream_connections")
            if v is not None:
                self.max_upstream = v if self.max_upstream is None else max(self.max_upstream, v)
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join(2)
            self._t = None


# -- S2 -------------------------------------------------------------------------------------


async def prefill(port: int, queue: str, ids: list[int]) -> None:
    conn = await fastamqp.connect("127.0.0.1", port)
    await conn.publish_many(queue, ids)
    await conn.declare_passive(queue)
    await conn.close_channel()
    await conn.close()


def cpu_probe(pids: dict[str, int | None]) -> Callable[[], dict[str, float]]:
    """Reads the CPU seconds of each named process (with its live children) when called."""

    def probe() -> dict[str, float]:
        return {name: s for name, pid in pids.items() if (s := cpu(pid)) is not None}

    return probe


async def s2_client(
    port: int, queue: str, test: str, ids: list[int], probe: Callable[[], dict[str, float]]
) -> dict[str, Any]:
    """One S2 measurement on one connection; the connect is not timed. `probe` is read just
    before and just after the timed part, while the connection (and socat's child) lives."""
    frames = fastamqp.build_publish_frames(queue, ids) if test in ("publish", "confirm") else []
    conn = await fastamqp.connect("127.0.0.1", port)
    out: dict[str, Any] = {}
    try:
        if test == "confirm":
            await conn.confirm_select()
        cpu0 = probe()
        t0 = time.perf_counter()
        if test == "publish":
            await conn.publish_frames(frames)
            await conn.declare_passive(queue)  # the fence: a synchronous call on the same channel
        elif test == "confirm":
            out["nacks"] = await conn.publish_confirmed(frames, window=100)
        elif test == "consume_noack":
            out["ids"] = await conn.consume(queue, len(ids), no_ack=True)
        else:
            out["ids"] = await conn.consume(queue, len(ids), no_ack=False, prefetch=1000)
        out["elapsed"] = time.perf_counter() - t0
        cpu1 = probe()
        out["cpu_s"] = {k: cpu1[k] - cpu0[k] for k in cpu1 if k in cpu0}
        await conn.close_channel()
        await conn.close()
    except BaseException:
        conn.abort()
        raise
    return out


def consume_check(admin: Admin, queue: str, ids: list[int], got: list[int]) -> dict[str, Any]:
    """Every prefilled id consumed exactly once, nothing left in the queue."""
    left = admin.settled_count(queue, 0)
    dups = len(got) - len(set(got))
    missing = len(set(ids) - set(got))
    return {
        "ok": dups == 0 and missing == 0 and left == 0 and len(got) == len(ids),
        "received": len(got),
        "duplicates": dups,
        "missing": missing,
        "left_in_queue": left,
    }


# -- S3 -------------------------------------------------------------------------------------


def run_s3_clients(
    port: int, queue: str, loops: int, duration: float, procs: int, delay: float = 1.0
) -> dict[str, Any]:
    """Run the S3 loops in `procs` child processes that start together, `delay` seconds from
    now (once every child has imported its modules); merge their results."""
    procs = max(1, min(procs, loops))
    start_at = time.time() + delay
    children = []
    for k in range(procs):
        share = loops // procs + (1 if k < loops % procs else 0)
        cmd = [sys.executable, os.path.join(BENCH_DIR, "fastamqp.py"), "s3", "--port", str(port),
               "--queue", queue, "--loops", str(share), "--duration", str(duration),
               "--id-base", str(k * 10**9), "--start-at", repr(start_at)]  # fmt: skip
        children.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    merged: dict[str, Any] = {"elapsed_s": 0.0, "client_cpu_s": 0.0, "lat_ms": [], "ids": [],
                              "maybe_ids": [], "errors": [], "n_errors": 0}  # fmt: skip
    failures = []
    for ch in children:
        try:
            out, err = ch.communicate(timeout=duration + 120)
        except subprocess.TimeoutExpired:
            ch.kill()
            out, err = ch.communicate()
        if ch.returncode != 0:
            failures.append(err.strip()[-300:])
            continue
        r = json.loads(out)
        merged["elapsed_s"] = max(merged["elapsed_s"], r["elapsed_s"])
        merged["client_cpu_s"] += r["client_cpu_s"]
        for key in ("lat_ms", "ids", "maybe_ids", "errors"):
            merged[key] += r[key]
        merged["n_errors"] += r["n_errors"]
    if failures:
        raise RuntimeError(f"s3 client failed: {failures[0]}")
    return merged


# -- S4 -------------------------------------------------------------------------------------


async def s4_clients(p: Proxy, n: int, settle: float, max_upstream: int) -> dict[str, Any]:
    """Open n idle clients with a channel each, measure, then close them all."""
    conns: list[fastamqp.FastConn] = []
    error = None
    sem = asyncio.Semaphore(50)

    async def one() -> None:
        async with sem:
            conns.append(await fastamqp.connect("127.0.0.1", p.port))

    try:
        for k in range(0, n, 100):
            await asyncio.gather(*(one() for _ in range(min(100, n - k))))
            up = p.metric("amqproxy_upstream_connections")
            if up is not None and up > max_upstream:
                error = f"proxy opened {up} upstream connections: S4 stopped to protect the broker"
                break
    except Exception as e:
        error = f"after {len(conns)} clients: {e!r}"[:300]
    await asyncio.sleep(1.0)
    rss_with = rss_kib(p.pid)
    upstream_with = p.metric("amqproxy_upstream_connections")
    clients_with = p.metric("amqproxy_client_connections")
    leased_with = p.metric("amqproxy_leased_channels")
    opened = len(conns)

    async def close(c: fastamqp.FastConn) -> None:
        async with sem:
            try:
                await c.close_channel()
                await c.close()
            except Exception:
                c.abort()

    await asyncio.gather(*(close(c) for c in conns))
    await asyncio.sleep(settle)
    return {
        "rss_with": rss_with,
        "opened": opened,
        "upstream_with": upstream_with,
        "clients_with": clients_with,
        "leased_with": leased_with,
        "error": error,
    }


# -- S5: faults -----------------------------------------------------------------------------


def fault_relay(broker_port: int) -> Any:
    """The test suites' FaultRelay (tests/support/relay.py) in front of the broker, started."""
    tests = os.path.join(REPO_DIR, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from support.relay import FaultRelay

    return FaultRelay(("127.0.0.1", broker_port)).start()


def outage(relay: Any, seconds: float, run: Any) -> None:
    """Cut every relayed connection (RST), refuse new ones for `seconds`, then forward again."""
    relay.mode = "refuse"
    run.metrics["connections_cut"] = relay.cut()
    time.sleep(seconds)
    relay.mode = "forward"


def loss_report(admin: Admin, queue: str, res: dict[str, Any]) -> dict[str, Any]:
    """Compare what the loops were told was handed over with what the queue holds, once the
    queue has stopped growing (a proxy may still be replaying)."""
    handed, failed = res["ids"], res["maybe_ids"]
    count = admin.settled_count(queue, len(handed), timeout=30, stable_s=2.0)
    got = fastamqp.run(fastamqp.drain_ids("127.0.0.1", admin.port, queue, count)) if count else []
    counts = Counter(got)
    lat = res["lat_ms"]
    return {
        "handed_over": len(handed),
        "in_queue": len(got),
        "lost": len(set(handed) - counts.keys()),
        "duplicated": sum(c - 1 for c in counts.values() if c > 1),
        "client_errors": res["n_errors"],
        "failed_cycles_delivered": len(set(failed) & counts.keys()),
        "unexpected": len(counts.keys() - set(handed) - set(failed)),
        "cycles_s": len(handed) / res["elapsed_s"],
        "p99_ms": percentile(lat, 99),
        "max_cycle_ms": max(lat) if lat else float("nan"),
    }


# -- S6: isolation --------------------------------------------------------------------------


def mistakes() -> list[bytes]:
    """What S6's bad clients send after Channel.Open(1): well-formed frames in the wrong place
    (a broker closes the whole connection for them: 504, 505, 540) and malformed ones (the
    soak's), as tests/integration/test_isolation.py checks them one by one."""
    from pamqp import body, commands, header
    from pamqp.frame import marshal
    from soak import BAD_INPUTS

    def publish(immediate: bool = False) -> bytes:
        return marshal(commands.Basic.Publish(routing_key="nowhere", immediate=immediate), 1)

    head = marshal(header.ContentHeader(0, 1, commands.Basic.Properties()), 1)
    one = marshal(body.ContentBody(b"x"), 1)
    qos = marshal(commands.Basic.Qos(0, 1, False), 1)
    misplaced = [
        head,  # a content header without a publish
        one,  # a body without a header
        publish() + qos,  # a method inside content
        publish(immediate=True) + head + one,  # immediate=true: 540 NOT_IMPLEMENTED
        marshal(commands.Basic.QosOk(), 1),  # a server's method from a client
        marshal(commands.Channel.Open(), 1),  # the channel again
        marshal(commands.Basic.Qos(0, 1, False), 3),  # a channel never opened
        publish() + b"\x02\x00\x01\x00\x00\x00\x0e" + struct.pack(">HHQH", 60, 1, 1, 0) + b"\xce",
    ]
    return misplaced + list(BAD_INPUTS)


async def isolation(
    port: int, queue: str, duration: float, bad_every: float, id_base: int
) -> dict[str, Any]:
    """A confirm publisher (the witness) on one connection while malformed clients with the same
    credentials come and go; the witness reconnects after an error and goes on."""
    bad_inputs = mistakes()
    deadline = time.monotonic() + duration
    out: dict[str, Any] = {"ids": [], "maybe_ids": [], "witness_errors": 0, "bad_clients": 0}
    first_errors: list[str] = []

    async def witness() -> None:
        conn: fastamqp.FastConn | None = None
        i = id_base
        while time.monotonic() < deadline:
            batch, i = list(range(i, i + 100)), i + 100
            try:
                if conn is None:
                    conn = await asyncio.wait_for(fastamqp.connect("127.0.0.1", port), 5)
                    await asyncio.wait_for(conn.confirm_select(), 5)
                frames = fastamqp.build_publish_frames(queue, batch)
                # a proxy that lost its upstream may leave the witness waiting: 3 s is an error
                nacks = await asyncio.wait_for(conn.publish_confirmed(frames, window=50), 3)
                out["maybe_ids" if nacks else "ids"].extend(batch)
            except Exception as e:
                out["witness_errors"] += 1
                first_errors.append(repr(e)[:160])
                out["maybe_ids"].extend(batch)
                if conn is not None:
                    conn.abort()
                conn = None
                await asyncio.sleep(0.05)
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception as e:
                out["witness_errors"] += 1
                first_errors.append(f"close: {e!r}"[:160])
                conn.abort()

    async def bad() -> None:
        n = 0
        while time.monotonic() < deadline:
            try:
                c = await asyncio.wait_for(fastamqp.connect("127.0.0.1", port), 2)
                c.write(bad_inputs[n % len(bad_inputs)])
                await asyncio.sleep(0.05)
                c.abort()
                out["bad_clients"] += 1
            except Exception:
                pass
            n += 1
            await asyncio.sleep(bad_every)

    t0 = time.monotonic()
    await asyncio.gather(witness(), bad())
    out["witness_confirmed"] = len(out["ids"])
    out["witness_msg_s"] = len(out["ids"]) / (time.monotonic() - t0)
    out["witness_first_errors"] = first_errors[:3]
    return out
