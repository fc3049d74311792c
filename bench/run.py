"""amqproxy benchmark runner: the scenarios of BENCHMARKS.md in one command.

    python bench/run.py [--quick|--full] [--scenarios S1,S2,S3,S4] [--json out.json]

Starts what it needs (the proxy under test, delay relays, a socat relay, a private TLS RabbitMQ
node), interleaves direct and proxied runs, checks every run's queue for exactly the messages
published, stops everything it started, prints a table and writes JSON. When the proxy cannot be
started the direct runs still happen and the table says the proxied ones were skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastamqp  # noqa: E402
from common import (  # noqa: E402
    RESULTS_DIR,
    Admin,
    Proxy,
    ProxyUnavailable,
    Socat,
    cpu_seconds,
    percentile,
    pid_listening_on,
    rss_kib,
    summarize_ms,
    tree_cpu_seconds,
    verify_queue,
)
from delayrelay import RelayProcess, calibrate  # noqa: E402
from s1clients import CLIENTS, Target, run_client  # noqa: E402

BROKER_PORT = 5672
MAX_DIRECT_CONNS = 450  # the shared broker has ~830 sockets: stay well below


@dataclass
class Mode:
    """Sizes and repeat counts for one run mode."""

    name: str
    repeats: int
    s1_rtts: list[int]
    s1_tls_rtts: list[int]
    s1_n_max: int
    s1_budget_s: float
    s2_publish: int
    s2_confirm: int
    s2_consume: int
    s3_loops: list[int]
    s3_rtts: list[int]
    s3_duration: float
    s4_clients: int
    s4_settle_s: float


QUICK = Mode(
    name="quick",
    repeats=1,
    s1_rtts=[0, 50],
    s1_tls_rtts=[],
    s1_n_max=60,
    s1_budget_s=1.2,
    s2_publish=20_000,
    s2_confirm=5_000,
    s2_consume=20_000,
    s3_loops=[50, 200],
    s3_rtts=[0, 50],
    s3_duration=2.5,
    s4_clients=1000,
    s4_settle_s=2.0,
)
FULL = Mode(
    name="full",
    repeats=3,
    s1_rtts=[0, 10, 50],
    s1_tls_rtts=[0, 50],
    s1_n_max=200,
    s1_budget_s=1.5,
    s2_publish=100_000,
    s2_confirm=20_000,
    s2_consume=100_000,
    s3_loops=[50, 200],
    s3_rtts=[0, 50],
    s3_duration=15.0,
    s4_clients=1000,
    s4_settle_s=5.0,
)

TARGETS = {
    # S1: proxied at RTT 50 / the same client direct at RTT 0 must stay at or below this
    "pika": 1.5,
    "php-loop": 1.5,
    "php-proc": 1.2,
    "amqp-publish": 1.2,
}


@dataclass
class Run:
    scenario: str
    case: dict[str, Any]
    mode: str  # direct | proxy | socat
    rep: int
    metrics: dict[str, Any] = field(default_factory=dict)
    verify: dict[str, Any] | None = None
    error: str | None = None
    skipped: str | None = None

    def key(self) -> str:
        return json.dumps(self.case, sort_keys=True)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    """Owns every process the bench starts, and stops them all in close()."""

    def __init__(self, mode: Mode, scenarios: list[str], proxy_wanted: bool) -> None:
        self.mode = mode
        self.scenarios = scenarios
        self.runs: list[Run] = []
        self.notes: list[str] = []
        self.relays: dict[tuple[int, int], RelayProcess] = {}
        self.proxies: dict[str, Proxy] = {}
        self.proxy_failed: dict[str, str] = {}
        self.proxy_ok = proxy_wanted
        self.proxy_reason = "" if proxy_wanted else "disabled with --no-proxy"
        self.tls: Any = None
        self.socat: Socat | None = None
        self.admins: dict[int, Admin] = {}
        self.calibration: dict[str, Any] = {}
        self.id_seq = 0
        self.broker_pid = pid_listening_on(BROKER_PORT)
        self.s3_procs = 1
        self.scanner = "unknown"  # the proxy's frame scanner, from its startup line
        self.baseline: str | None = None  # src/ of an earlier version measured beside (--baseline)
        self.t0 = time.monotonic()

    # -- resources -------------------------------------------------------------------------

    def admin(self, port: int) -> Admin:
        if port not in self.admins:
            self.admins[port] = Admin(port)
        return self.admins[port]

    def relay(self, rtt: int, target_port: int) -> int:
        """Port to reach `target_port` with `rtt` ms upstream latency (no relay at RTT 0)."""
        if rtt == 0:
            return target_port
        key = (rtt, target_port)
        if key not in self.relays:
            self.relays[key] = RelayProcess(("127.0.0.1", target_port), rtt).start()
            r = self.relays[key]
            cal = calibrate("127.0.0.1", r.port, n=10) if target_port == BROKER_PORT else None
            if cal:
                self.calibration[f"rtt{rtt}"] = cal
                log(f"delay relay RTT {rtt} ms: basic.qos {cal['median_ms']:.2f} ms median")
        return self.relays[key].port

    @property
    def proxy_modes(self) -> list[str]:
        """The proxies measured beside direct: ours, and the baseline version with --baseline."""
        return ["proxy", "baseline"] if self.baseline else ["proxy"]

    def proxy(self, upstream_port: int, tls: bool = False, kind: str = "proxy") -> Proxy | None:
        """The proxy (``kind`` "baseline": the --baseline version) in front of `upstream_port`
        (started once, kept for the session)."""
        if not self.proxy_ok:
            return None
        scheme = "amqps" if tls else "amqp"
        url = f"{scheme}://127.0.0.1:{upstream_port}"
        if kind == "baseline":
            url += "#baseline"
        p = self.proxies.get(url)
        if p is not None and p.alive():
            return p
        if p is not None:
            self.notes.append(f"proxy for {url} died; log tail: {p.log_tail()}")
            p.stop()
        if url in self.proxy_failed:
            return None
        try:
            src = self.baseline if kind == "baseline" else None
            p = Proxy(url.split("#")[0], ca=self.tls.ca if tls else None, src=src).start()
        except ProxyUnavailable as e:
            self.proxy_failed[url] = str(e)
            self.notes.append(str(e))
            log(f"proxy unavailable: {e}")
            return None
        self.proxies[url] = p
        if self.scanner == "unknown":
            self.scanner = p.frame_scanner()
            log(f"proxy frame scanner: {self.scanner}")
        return p

    def tls_broker(self) -> Any:
        if self.tls is None:
            from tlsbroker import TLSBroker

            log("starting private TLS RabbitMQ node bench-tls@localhost ...")
            t0 = time.monotonic()
            self.tls = TLSBroker().start()
            log(f"TLS node ready in {time.monotonic() - t0:.1f}s (tls port {self.tls.tls_port})")
        return self.tls

    def next_ids(self, n: int) -> int:
        base = self.id_seq
        self.id_seq += n + 1
        return base

    def close(self) -> None:
        """Stop everything this bench started; one failing step does not skip the others."""
        steps: list[tuple[str, Any]] = [(f"admin {p}", a.close) for p, a in self.admins.items()]
        steps += [(f"proxy {u}", p.stop) for u, p in self.proxies.items()]
        steps += [(f"relay {k}", r.stop) for k, r in self.relays.items()]
        if self.socat is not None:
            steps.append(("socat", self.socat.stop))
        if self.tls is not None:
            log("stopping TLS node ...")
            steps.append(("TLS node", self.tls.stop))
        for name, stop in steps:
            try:
                stop()
            except Exception as e:  # noqa: BLE001 - report and go on with the rest
                log(f"cleanup of {name} failed: {e!r}")
        self.tls = None
        self.socat = None

    def order(self, rep: int, modes: list[str]) -> list[str]:
        """A B, B A, ...: interleave so drift hits both sides alike."""
        return modes if rep % 2 == 0 else list(reversed(modes))

    def add(self, run: Run) -> Run:
        self.runs.append(run)
        tag = run.skipped and f"SKIPPED ({run.skipped})" or run.error or ""
        v = run.verify
        vtxt = "" if v is None else (" verify ok" if v["ok"] else f" VERIFY FAILED {v}")
        brief = {k: round(x, 3) if isinstance(x, float) else x for k, x in run.metrics.items()}
        log(f"{run.scenario} {run.case} {run.mode} rep{run.rep}: {brief}{vtxt} {tag}")
        return run

    # -- S1 --------------------------------------------------------------------------------

    def s1(self) -> None:
        m = self.mode
        cases = [(c, False, r) for r in m.s1_rtts for c in CLIENTS]
        if m.s1_tls_rtts:
            try:
                self.tls_broker()
                cases += [(c, True, r) for r in m.s1_tls_rtts for c in CLIENTS]
            except Exception as e:  # noqa: BLE001 - TLS cases reported as skipped
                self.notes.append(f"TLS node failed to start, TLS cases skipped: {e!r}")
        for rep in range(m.repeats):
            for client, tls, rtt in cases:
                case = {"client": client, "tls": tls, "rtt_ms": rtt}
                for mode in self.order(rep, ["direct", *self.proxy_modes]):
                    self.s1_run(case, mode, rep)

    def s1_run(self, case: dict[str, Any], mode: str, rep: int) -> None:
        tls, rtt, client = case["tls"], case["rtt_ms"], case["client"]
        run = Run("S1", case, mode, rep)
        broker_plain = self.tls.plain_port if tls else BROKER_PORT
        upstream = self.tls.tls_port if tls else BROKER_PORT
        up_port = self.relay(rtt, upstream)
        if mode == "direct":
            target = Target(up_port, tls_ca=self.tls.ca if tls else None)
        else:
            p = self.proxy(up_port, tls, kind=mode)
            if p is None:
                run.skipped = self.proxy_reason or "proxy unavailable"
                self.add(run)
                return
            target = Target(p.port)  # the client speaks plain AMQP to the local proxy
        admin = self.admin(broker_plain)
        queue = admin.new_queue("s1")
        n_max = self.mode.s1_n_max
        base = self.next_ids(n_max)
        try:
            res = run_client(client, target, queue, base, n_max, self.mode.s1_budget_s)
            run.metrics = summarize_ms(res.times_ms[1:])  # first cycle is a warm-up
            run.error = res.error
            run.verify = verify_queue(admin, queue, res.ids, res.maybe_ids, delete=False)
        except Exception as e:  # noqa: BLE001 - one failed run must not end the session
            run.error = repr(e)[:300]
        finally:
            admin.delete(queue)
        self.add(run)

    # -- S2 --------------------------------------------------------------------------------

    def s2(self) -> None:
        self.socat = Socat(BROKER_PORT).start()
        tests = ["publish", "confirm", "consume_noack", "consume_ack"]
        for rep in range(self.mode.repeats):
            for test in tests:
                for mode in self.order(rep, ["direct", "socat", *self.proxy_modes]):
                    self.s2_run(test, mode, rep)

    def s2_run(self, test: str, mode: str, rep: int) -> None:
        m = self.mode
        run = Run("S2", {"test": test}, mode, rep)
        pid: int | None = None
        children = False
        if mode == "direct":
            port = BROKER_PORT
        elif mode == "socat":
            assert self.socat is not None
            port, pid, children = self.socat.port, self.socat.pid, True
        else:
            p = self.proxy(BROKER_PORT, kind=mode)
            if p is None:
                run.skipped = self.proxy_reason or "proxy unavailable"
                self.add(run)
                return
            port, pid, children = p.port, p.pid, True
        admin = self.admin(BROKER_PORT)
        queue = admin.new_queue("s2")
        n = {"publish": m.s2_publish, "confirm": m.s2_confirm}.get(test, m.s2_consume)
        base = self.next_ids(n)
        ids = list(range(base, base + n))
        try:
            if test.startswith("consume"):
                fastamqp.run(_prefill(BROKER_PORT, queue, ids))
                admin.settled_count(queue, n)
            cpu0 = _cpu(pid, children)
            bcpu0 = _cpu(self.broker_pid, False)
            res = fastamqp.run(_s2_client(port, queue, test, ids))
            time.sleep(0.05 if mode != "socat" else 0.3)  # let socat's child exit and be reaped
            cpu1 = _cpu(pid, children)
            bcpu1 = _cpu(self.broker_pid, False)
            run.metrics = {"msg_s": n / res["elapsed"], "elapsed_s": res["elapsed"], "n": n}
            if cpu0 is not None and cpu1 is not None:
                run.metrics["cpu_us_per_msg"] = (cpu1 - cpu0) / n * 1e6
            if bcpu0 is not None and bcpu1 is not None:
                run.metrics["broker_cpu_us_per_msg"] = (bcpu1 - bcpu0) / n * 1e6
            if test.startswith("consume"):
                got = res["ids"]
                left = admin.settled_count(queue, 0)
                dups = len(got) - len(set(got))
                missing = len(set(ids) - set(got))
                run.verify = {
                    "ok": dups == 0 and missing == 0 and left == 0 and len(got) == n,
                    "received": len(got),
                    "duplicates": dups,
                    "missing": missing,
                    "left_in_queue": left,
                }
            else:
                run.metrics["nacks"] = res.get("nacks", 0)
                run.verify = verify_queue(admin, queue, ids, delete=False)
        except Exception as e:  # noqa: BLE001
            run.error = repr(e)[:300]
        finally:
            admin.delete(queue)
        self.add(run)

    # -- S3 --------------------------------------------------------------------------------

    def s3(self) -> None:
        m = self.mode
        for rep in range(m.repeats):
            for rtt in m.s3_rtts:
                for loops in m.s3_loops:
                    for mode in self.order(rep, ["direct", *self.proxy_modes]):
                        self.s3_run({"loops": loops, "rtt_ms": rtt}, mode, rep)

    def s3_run(self, case: dict[str, Any], mode: str, rep: int) -> None:
        loops, rtt = case["loops"], case["rtt_ms"]
        run = Run("S3", case, mode, rep)
        up_port = self.relay(rtt, BROKER_PORT)
        proxy = None
        if mode == "direct":
            if loops > MAX_DIRECT_CONNS:
                run.skipped = f"more than {MAX_DIRECT_CONNS} direct connections"
                self.add(run)
                return
            port = up_port
        else:
            proxy = self.proxy(up_port, kind=mode)
            if proxy is None:
                run.skipped = self.proxy_reason or "proxy unavailable"
                self.add(run)
                return
            port = proxy.port
        admin = self.admin(BROKER_PORT)
        queue = admin.new_queue("s3")
        sampler = _MetricSampler(proxy) if proxy else None
        connects0 = proxy.metric("amqproxy_upstream_connects_total") if proxy else None
        opens0 = proxy.metric("amqproxy_upstream_channel_opens_total") if proxy else None
        bcpu0 = _cpu(self.broker_pid, False)
        pcpu0 = _cpu(proxy.pid, True) if proxy else None
        try:
            if sampler:
                sampler.start()
            res = _run_s3_clients(port, queue, loops, self.mode.s3_duration, self.s3_procs)
            if sampler:
                sampler.stop()
            bcpu1 = _cpu(self.broker_pid, False)
            n = len(res["ids"])
            lat = res["lat_ms"]
            run.metrics = {
                "pub_s": n / res["elapsed_s"],
                "p50_ms": percentile(lat, 50),
                "p99_ms": percentile(lat, 99),
                "published": n,
                "errors": res["n_errors"],
                "client_cpu_frac": res["client_cpu_s"] / res["elapsed_s"],
            }
            if bcpu0 is not None and bcpu1 is not None and n:
                run.metrics["broker_cpu_us_per_pub"] = (bcpu1 - bcpu0) / n * 1e6
            if proxy is not None:
                pcpu1 = _cpu(proxy.pid, True)
                if pcpu0 is not None and pcpu1 is not None and n:
                    run.metrics["proxy_cpu_us_per_pub"] = (pcpu1 - pcpu0) / n * 1e6
                    run.metrics["proxy_cpu_frac"] = (pcpu1 - pcpu0) / res["elapsed_s"]
                opens1 = proxy.metric("amqproxy_upstream_channel_opens_total")
                if opens0 is not None and opens1 is not None:
                    run.metrics["upstream_channel_opens"] = opens1 - opens0
                connects1 = proxy.metric("amqproxy_upstream_connects_total")
                if connects0 is not None and connects1 is not None:
                    run.metrics["upstream_connects"] = connects1 - connects0
                if sampler and sampler.max_upstream is not None:
                    run.metrics["upstream_conns_max"] = sampler.max_upstream
            if res["n_errors"]:
                run.error = f"{res['n_errors']} failed cycles, e.g. {res['errors'][:2]}"
            run.verify = verify_queue(admin, queue, res["ids"], res["maybe_ids"], delete=False)
        except Exception as e:  # noqa: BLE001
            run.error = repr(e)[:300]
        finally:
            if sampler:
                sampler.stop()
            admin.delete(queue)
        self.add(run)

    # -- S4 --------------------------------------------------------------------------------

    def s4(self) -> None:
        if not self.proxy_ok:
            self.add(
                Run(
                    "S4",
                    {"clients": self.mode.s4_clients},
                    "proxy",
                    0,
                    skipped=self.proxy_reason or "proxy unavailable",
                )
            )
            return
        for rep in range(self.mode.repeats):
            # a fresh proxy per repeat: its baseline is a clean process, not the last repeat's
            try:
                p = Proxy(f"amqp://127.0.0.1:{BROKER_PORT}").start()
            except ProxyUnavailable as e:
                self.notes.append(str(e))
                self.add(Run("S4", {"clients": self.mode.s4_clients}, "proxy", rep, skipped=str(e)))
                return
            try:
                # warm the pool (imports, first upstream connection) before the baseline
                fastamqp.run(fastamqp.short_cycle("127.0.0.1", p.port, "amqproxy-bench-none", 0))
                time.sleep(0.5)
                self.s4_run(p, rep)
            finally:
                p.stop()

    def s4_run(self, p: Proxy, rep: int) -> None:
        n = self.mode.s4_clients
        run = Run("S4", {"clients": n}, "proxy", rep)
        try:
            rss0 = rss_kib(p.pid)
            res = fastamqp.run(_s4_clients(p, n, self.mode.s4_settle_s))
            rss_after = rss_kib(p.pid)
            rss_with = res["rss_with"]
            run.metrics = {
                "rss_before_kib": rss0,
                "rss_with_kib": rss_with,
                "rss_after_kib": rss_after,
                "kib_per_client": (rss_with - rss0) / n,
                "returned_frac": (rss_with - rss_after) / max(1, rss_with - rss0),
                "opened": res["opened"],
                "upstream_conns_with": res["upstream_with"],
                "client_conns_with": res["clients_with"],
                "leased_channels_with": res["leased_with"],
                "upstream_conns_after": p.metric("amqproxy_upstream_connections"),
            }
            if res["error"]:
                run.error = res["error"]
        except Exception as e:  # noqa: BLE001
            run.error = repr(e)[:300]
        self.add(run)

    # -- everything ------------------------------------------------------------------------

    def run_all(self) -> None:
        if self.proxy_ok:
            ok, why = Proxy.available()
            if not ok:
                self.proxy_ok = False
                self.proxy_reason = f"`python -m {Proxy.module} --help` fails: {why}"
                log(f"PROXY NOT AVAILABLE — proxied runs will be skipped: {why}")
        for s in self.scenarios:
            log(f"=== {s} ({self.mode.name}) ===")
            getattr(self, s.lower())()


class _MetricSampler:
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


def _run_s3_clients(
    port: int, queue: str, loops: int, duration: float, procs: int
) -> dict[str, Any]:
    """Run the S3 loops in `procs` child processes that start together; merge their results."""
    procs = max(1, min(procs, loops))
    start_at = time.time() + 1.0  # after every child has imported its modules
    children = []
    for k in range(procs):
        share = loops // procs + (1 if k < loops % procs else 0)
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
               "fastamqp.py"), "s3", "--port", str(port), "--queue", queue, "--loops",
               str(share), "--duration", str(duration), "--id-base", str(k * 10**9),
               "--start-at", repr(start_at)]  # fmt: skip
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


def _cpu(pid: int | None, children: bool) -> float | None:
    if not pid:
        return None
    try:
        # socat forks a child per connection: count live children and reaped ones alike
        return tree_cpu_seconds(pid) if children else cpu_seconds(pid)
    except OSError:
        return None


async def _prefill(port: int, queue: str, ids: list[int]) -> None:
    conn = await fastamqp.connect("127.0.0.1", port)
    await conn.publish_many(queue, ids)
    await conn.declare_passive(queue)
    await conn.close_channel()
    await conn.close()


async def _s2_client(port: int, queue: str, test: str, ids: list[int]) -> dict[str, Any]:
    """One S2 measurement on one connection; the connect is not timed."""
    frames = fastamqp.build_publish_frames(queue, ids) if test in ("publish", "confirm") else []
    conn = await fastamqp.connect("127.0.0.1", port)
    out: dict[str, Any] = {}
    try:
        if test == "confirm":
            await conn.confirm_select()
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
        await conn.close_channel()
        await conn.close()
    except BaseException:
        conn.abort()
        raise
    return out


async def _s4_clients(p: Proxy, n: int, settle: float) -> dict[str, Any]:
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
            if up is not None and up > MAX_DIRECT_CONNS:
                error = f"proxy opened {up} upstream connections: S4 stopped to protect the broker"
                break
    except Exception as e:  # noqa: BLE001
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
            except Exception:  # noqa: BLE001
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


# -- report ---------------------------------------------------------------------------------


def _med(vals: list[float]) -> float:
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else float("nan")


def _fmt(vals: list[float], digits: int = 2) -> str:
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    med = statistics.median(vals)
    if len(vals) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{min(vals):.{digits}f}–{max(vals):.{digits}f}]"


def _ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "-"
    return f"{a / b:.2f}"


def summarize(bench: Bench) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    summary: dict[str, Any] = {}
    groups: dict[tuple[str, str], dict[str, list[Run]]] = {}
    for r in bench.runs:
        groups.setdefault((r.scenario, r.key()), {}).setdefault(r.mode, []).append(r)

    def group(scenario: str, case: dict[str, Any], mode: str) -> list[Run]:
        return groups.get((scenario, json.dumps(case, sort_keys=True)), {}).get(mode, [])

    def vals(runs: list[Run], metric: str) -> list[float]:
        return [r.metrics[metric] for r in runs if metric in r.metrics and not r.error]

    def status(runs: list[Run]) -> str:
        if runs and all(r.skipped for r in runs):
            return "skipped"
        bad = [r for r in runs if r.error or (r.verify is not None and not r.verify["ok"])]
        return f"{len(bad)} FAILED" if bad else "ok"

    # S1
    s1 = [(json.loads(k), g) for (s, k), g in groups.items() if s == "S1"]
    if s1:
        lines.append("S1 short-lived publisher: ms per connect-publish-close cycle (mean)")
        lines.append(
            f"{'client':13} {'tls':4} {'rtt':>4} | {'direct mean':>24} {'p50':>7} {'p99':>7} | "
            f"{'proxy mean':>24} {'p50':>7} {'p99':>7} | {'ratio':>5} | check"
        )
        for case, g in sorted(s1, key=lambda x: (x[0]["tls"], x[0]["client"], x[0]["rtt_ms"])):
            d, p = g.get("direct", []), g.get("proxy", [])
            dm, pm = _med(vals(d, "mean_ms")), _med(vals(p, "mean_ms"))
            lines.append(
                f"{case['client']:13} {'yes' if case['tls'] else 'no':4} {case['rtt_ms']:>4} | "
                f"{_fmt(vals(d, 'mean_ms')):>24} {_med(vals(d, 'p50_ms')):7.2f} "
                f"{_med(vals(d, 'p99_ms')):7.2f} | {_fmt(vals(p, 'mean_ms')):>24} "
                f"{_med(vals(p, 'p50_ms')):7.2f} {_med(vals(p, 'p99_ms')):7.2f} | "
                f"{_ratio(pm, dm):>5} | direct {status(d)}, proxy {status(p)}"
            )
        lines.append("")
        lines.append("S1 target: proxied at RTT 50 / same client direct at RTT 0 (mean per cycle)")
        for tls in (False, True):
            for client in CLIENTS:
                d0 = group("S1", {"client": client, "rtt_ms": 0, "tls": tls}, "direct")
                p50 = group("S1", {"client": client, "rtt_ms": 50, "tls": tls}, "proxy")
                if not d0 and not p50:
                    continue
                a, b = _med(vals(p50, "mean_ms")), _med(vals(d0, "mean_ms"))
                target = TARGETS[client]
                ratio = a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")
                verdict = "-" if math.isnan(ratio) else ("MET" if ratio <= target else "missed")
                lines.append(
                    f"  {client:13} tls={'yes' if tls else 'no':3} proxied@50 {a:8.2f} ms / "
                    f"direct@0 {b:7.2f} ms = {ratio:6.2f}  (target ≤ {target}) {verdict}"
                )
                summary[f"S1 {client}{' tls' if tls else ''} proxied@50/direct@0"] = {
                    "ratio": ratio,
                    "target": target,
                    "proxied_rtt50_ms": a,
                    "direct_rtt0_ms": b,
                }
        lines.append("")

    # S2
    s2 = [(json.loads(k), g) for (s, k), g in groups.items() if s == "S2"]
    if s2:
        lines.append("S2 throughput on one connection, RTT 0: msg/s, CPU µs per message")
        lines.append(
            f"{'test':14} | {'direct msg/s':>22} | {'socat msg/s':>22} {'µs':>5} | "
            f"{'proxy msg/s':>22} {'µs':>5} | {'socat/d':>7} {'proxy/d':>7} | check"
        )
        targets = {"publish": 0.95, "confirm": 0.90, "consume_noack": 0.90, "consume_ack": 0.90}
        order = ["publish", "confirm", "consume_noack", "consume_ack"]
        for case, g in sorted(s2, key=lambda x: order.index(x[0]["test"])):
            d, s, p = g.get("direct", []), g.get("socat", []), g.get("proxy", [])
            dm, sm, pm = (_med(vals(x, "msg_s")) for x in (d, s, p))
            lines.append(
                f"{case['test']:14} | {_fmt(vals(d, 'msg_s'), 0):>22} | "
                f"{_fmt(vals(s, 'msg_s'), 0):>22} {_med(vals(s, 'cpu_us_per_msg')):5.2f} | "
                f"{_fmt(vals(p, 'msg_s'), 0):>22} {_med(vals(p, 'cpu_us_per_msg')):5.2f} | "
                f"{_ratio(sm, dm):>7} {_ratio(pm, dm):>7} | "
                f"d {status(d)}, s {status(s)}, p {status(p)}"
            )
            summary[f"S2 {case['test']} proxy/direct"] = {
                "ratio": pm / dm if dm and not math.isnan(pm) else float("nan"),
                "target": targets[case["test"]],
                "proxy_cpu_us_per_msg": _med(vals(p, "cpu_us_per_msg")),
            }
        lines.append(
            "  targets: proxy/direct ≥ 0.95 publish, ≥ 0.90 others; CPU ≤ 3 µs publish, "
            "≤ 6 µs consume"
        )
        lines.append("")

    # S3
    s3 = [(json.loads(k), g) for (s, k), g in groups.items() if s == "S3"]
    if s3:
        lines.append("S3 concurrent short-lived publishers: publishes/s, cycle p50/p99 ms")
        lines.append(
            f"{'loops':>5} {'rtt':>4} | {'direct pub/s':>22} {'p50':>7} {'p99':>7} | "
            f"{'proxy pub/s':>22} {'p50':>7} {'p99':>7} {'up':>4} {'conn':>5} | {'ratio':>5} "
            f"| check"
        )
        for case, g in sorted(s3, key=lambda x: (x[0]["rtt_ms"], x[0]["loops"])):
            d, p = g.get("direct", []), g.get("proxy", [])
            dm, pm = _med(vals(d, "pub_s")), _med(vals(p, "pub_s"))
            lines.append(
                f"{case['loops']:>5} {case['rtt_ms']:>4} | {_fmt(vals(d, 'pub_s'), 0):>22} "
                f"{_med(vals(d, 'p50_ms')):7.2f} {_med(vals(d, 'p99_ms')):7.2f} | "
                f"{_fmt(vals(p, 'pub_s'), 0):>22} {_med(vals(p, 'p50_ms')):7.2f} "
                f"{_med(vals(p, 'p99_ms')):7.2f} {_med(vals(p, 'upstream_conns_max')):4.0f} "
                f"{_med(vals(p, 'upstream_connects')):5.0f} | {_ratio(pm, dm):>5} | "
                f"direct {status(d)}, proxy {status(p)}"
            )
            if case["loops"] == 200 and case["rtt_ms"] == 50:
                summary["S3 200 loops RTT 50 proxy pub/s"] = {
                    "value": pm,
                    "target": 5000,
                    "upstream_conns_max": _med(vals(p, "upstream_conns_max")),
                }
        lines.append(
            "  up = max upstream connections (proxy gauge), conn = upstream connects during "
            "the run;\n  target at 200 loops RTT 50: ≥ 5,000/s with ≤ 2 upstream connections"
        )
        lines.append("")

    # S4
    s4 = [(json.loads(k), g) for (s, k), g in groups.items() if s == "S4"]
    for case, g in s4:
        p = g.get("proxy", [])
        lines.append(f"S4 memory, {case['clients']} idle clients with one channel each (proxy)")
        lines.append(
            f"  KiB/client {_fmt(vals(p, 'kib_per_client'), 1)}  RSS before "
            f"{_fmt(vals(p, 'rss_before_kib'), 0)} KiB, with {_fmt(vals(p, 'rss_with_kib'), 0)}, "
            f"after {_fmt(vals(p, 'rss_after_kib'), 0)}; returned "
            f"{_fmt([100 * v for v in vals(p, 'returned_frac')], 0)} %  (target ≤ 20 KiB, "
            f"returned) | {status(p)}"
        )
        summary["S4 KiB per client"] = {
            "value": _med(vals(p, "kib_per_client")),
            "target": 20,
        }
        lines.append("")

    if bench.baseline:
        lines += _ab_lines(groups, vals, summary)

    verdicts = _target_lines(summary)
    if verdicts:
        lines.append("Targets (BENCHMARKS.md) beyond S1:")
        lines += verdicts
        lines.append("")
    if bench.calibration:
        cal = ", ".join(
            f"{k}: {v['median_ms']:.2f} ms" for k, v in sorted(bench.calibration.items())
        )
        lines.append(f"delay relay calibration (sync basic.qos, median): {cal}")
    if bench.scanner != "unknown":
        lines.append(f"proxy frame scanner: {bench.scanner}")
    if not bench.proxy_ok:
        lines.append(f"PROXIED RUNS SKIPPED: {bench.proxy_reason}")
    elif bench.proxy_failed:
        lines.append(
            "PROXIED RUNS SKIPPED for upstream(s) "
            f"{', '.join(bench.proxy_failed)}: the proxy did not start (see notes)"
        )
    failed = [r for r in bench.runs if r.error or (r.verify is not None and not r.verify["ok"])]
    lines.append(
        f"runs: {len(bench.runs)}, failed: {len(failed)}, "
        f"skipped: {sum(1 for r in bench.runs if r.skipped)}"
    )
    for r in failed[:15]:
        lines.append(f"  FAILED {r.scenario} {r.case} {r.mode} rep{r.rep}: {r.error} {r.verify}")
    for n in bench.notes[:10]:
        lines.append(f"  note: {n[:400]}")
    return "\n".join(lines), summary


_AB_METRICS = {
    "S1": [("mean_ms", "ms/cycle")],
    "S2": [
        ("msg_s", "msg/s"),
        ("cpu_us_per_msg", "proxy µs/msg"),
        ("broker_cpu_us_per_msg", "broker µs/msg"),
    ],
    "S3": [
        ("pub_s", "pub/s"),
        ("proxy_cpu_us_per_pub", "proxy µs/cycle"),
        ("broker_cpu_us_per_pub", "broker µs/pub"),
    ],
}


def _ab_lines(
    groups: dict[tuple[str, str], dict[str, list[Run]]],
    vals: Any,
    summary: dict[str, Any],
) -> list[str]:
    """This proxy beside the --baseline version, run by run interleaved: medians and ratio."""
    lines = ["A/B: this proxy / the baseline version (medians of the interleaved repeats)"]
    for (scenario, key), g in sorted(groups.items()):
        if "baseline" not in g:
            continue
        case = ", ".join(f"{k}={v}" for k, v in json.loads(key).items())
        for metric, label in _AB_METRICS.get(scenario, []):
            a, b = _med(vals(g.get("proxy", []), metric)), _med(vals(g["baseline"], metric))
            if math.isnan(a) and math.isnan(b):
                continue
            lines.append(
                f"  {scenario} {case:38} {label:15} {a:10.2f} / {b:10.2f} = {_ratio(a, b):>5}"
            )
            summary[f"A/B {scenario} {case} {metric}"] = {"proxy": a, "baseline": b}
    lines.append("")
    return lines


def _target_lines(summary: dict[str, Any]) -> list[str]:
    """MET / missed for the S2-S4 targets (S1 is printed with its own table)."""

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("MET" if ok else "missed")

    def num(v: Any) -> float | None:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    out = []
    for key, v in summary.items():
        if key.startswith("S2 "):
            test = key.split()[1]
            ratio, cpu = num(v["ratio"]), num(v["proxy_cpu_us_per_msg"])
            cpu_target = 3.0 if test in ("publish", "confirm") else 6.0
            out.append(
                f"  S2 {test:14} proxy/direct {ratio if ratio is not None else float('nan'):5.2f} "
                f"(≥ {v['target']}) {verdict(None if ratio is None else ratio >= v['target'])}; "
                f"proxy CPU {cpu if cpu is not None else float('nan'):5.2f} µs/msg "
                f"(≤ {cpu_target}) {verdict(None if cpu is None else cpu <= cpu_target)}"
            )
        elif key.startswith("S3 "):
            val, up = num(v["value"]), num(v["upstream_conns_max"])
            ok = None if val is None else (val >= v["target"] and (up is None or up <= 2))
            out.append(
                f"  S3 200 loops RTT 50: {val if val is not None else float('nan'):7.0f} pub/s, "
                f"{up if up is not None else float('nan'):.0f} upstream (≥ 5000, ≤ 2) "
                f"{verdict(ok)}"
            )
        elif key.startswith("S4 "):
            val = num(v["value"])
            out.append(
                f"  S4 {val if val is not None else float('nan'):.1f} KiB per idle client "
                f"(≤ 20; returned after: see S4 line) {verdict(None if val is None else val <= 20)}"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (default)")
    g.add_argument("--full", action="store_true", help="BENCHMARKS.md sizes, 3 repeats")
    ap.add_argument("--scenarios", default="S1,S2,S3,S4", help="comma list, e.g. S1,S3")
    ap.add_argument("--json", help="write results here (default bench/results/<time>.json)")
    ap.add_argument("--repeats", type=int, help="override the repeat count")
    ap.add_argument("--s3-duration", type=float, help="seconds per S3 run (spec: 15)")
    ap.add_argument("--clients", help="S1 clients to run, e.g. pika,php-loop")
    ap.add_argument("--no-proxy", action="store_true", help="direct runs only")
    ap.add_argument("--tls", action="store_true", help="quick mode: add the TLS S1 cases")
    ap.add_argument("--proxy-module", default="amqproxy", help="python -m MODULE to start")
    ap.add_argument("--s3-procs", type=int, default=1, help="client processes for S3 loops")
    ap.add_argument(
        "--baseline",
        metavar="GIT_REF",
        help="also measure this proxy as of GIT_REF (a worktree under bench/results), "
        "interleaved with the current one: an A/B table per scenario",
    )
    args = ap.parse_args(argv)

    mode = FULL if args.full else QUICK
    if args.repeats:
        mode.repeats = args.repeats
    if args.tls and not mode.s1_tls_rtts:
        mode.s1_tls_rtts = [0, 50]
    if args.s3_duration:
        mode.s3_duration = args.s3_duration
    if args.clients:
        import s1clients

        wanted = tuple(c.strip() for c in args.clients.split(","))
        s1clients.CLIENTS = wanted  # type: ignore[misc]
        globals()["CLIENTS"] = wanted
    scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in ("S1", "S2", "S3", "S4")]
    if bad:
        ap.error(f"unknown scenarios {bad}")

    Proxy.module = args.proxy_module
    bench = Bench(mode, scenarios, proxy_wanted=not args.no_proxy)
    bench.s3_procs = args.s3_procs
    if args.baseline:
        from common import baseline_src

        bench.baseline = baseline_src(args.baseline)
        log(f"baseline: {args.baseline} from {bench.baseline}")

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a run started in the background by a non-interactive shell has it ignored
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    interrupted = False
    try:
        bench.run_all()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything the bench started")
    finally:
        # a second Ctrl-C must not cut the cleanup short (the TLS node takes seconds to stop)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        bench.close()
    table, summary = summarize(bench)
    print()
    print(table)
    out = args.json or os.path.join(RESULTS_DIR, time.strftime("bench-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    doc = {
        "mode": mode.__dict__,
        "scenarios": scenarios,
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "s3_client_procs": bench.s3_procs,
        "proxy_frame_scanner": bench.scanner,
        "baseline_src": bench.baseline,
        "proxy_available": bench.proxy_ok,
        "proxy_skip_reason": bench.proxy_reason,
        "relay_calibration": bench.calibration,
        "duration_s": time.monotonic() - bench.t0,
        "interrupted": interrupted,
        "summary": summary,
        "notes": bench.notes,
        "runs": [r.__dict__ for r in bench.runs],
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"\nJSON written to {out}  ({time.monotonic() - bench.t0:.0f} s)")
    return 130 if interrupted else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
