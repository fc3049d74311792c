"""Shared helpers for the runner: stats, process accounting, queues and their verification,
and the processes the bench starts (proxy under test, socat relay)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pika

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


# -- statistics -----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no data."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def summarize_ms(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0, "mean_ms": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan")}
    return {
        "n": len(samples),
        "mean_ms": statistics.fmean(samples),
        "p50_ms": percentile(samples, 50),
        "p99_ms": percentile(samples, 99),
    }


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.05)
    return False


def run_seconds(pid: int, children: bool = True) -> float:
    """Time on a CPU of every thread of a process (and of its live children), from
    /proc/PID/task/*/schedstat: nanosecond resolution where /proc/PID/stat counts 10 ms ticks.
    Children that have exited are not counted: read it while they live (socat's per-connection
    child)."""
    total = 0
    for p in [pid, *(child_pids(pid) if children else [])]:
        for path in glob.glob(f"/proc/{p}/task/*/schedstat"):
            with contextlib.suppress(OSError, ValueError), open(path) as f:
                total += int(f.read().split()[0])
    return total / 1e9


def child_pids(pid: int) -> list[int]:
    out = []
    for path in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError), open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(path.split("/")[2]))
    return out


def rss_kib(pid: int) -> int:
    """Resident set of a process and its live children, in KiB."""
    total = 0
    for p in [pid, *child_pids(pid)]:
        with contextlib.suppress(OSError), open(f"/proc/{p}/statm") as f:
            total += int(f.read().split()[1]) * PAGE_KIB
    return total


def pid_listening_on(port: int) -> int | None:
    """PID owning the TCP listener on `port` (used to find the shared broker's beam.smp)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(parts[9])
    if not inodes:
        return None
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return int(fd.split("/")[2])
    return None


class ProxyUnavailable(RuntimeError):
    """The proxy under test could not be started (e.g. not implemented yet)."""


# What the reference (cloudamqp/amqproxy 3.1.3) exports on /metrics: nothing else is asked of it.
REFERENCE_METRICS = frozenset(
    {"amqproxy_identity_info", "amqproxy_client_connections", "amqproxy_upstream_connections"}
)
# Configuration variables either proxy reads from its environment: never inherited.
PROXY_ENV_VARS = ("AMQP_URL", "LISTEN_ADDRESS", "LISTEN_PORT", "HTTP_PORT", "LOG_LEVEL",
                  "IDLE_CONNECTION_TIMEOUT", "MAX_UPSTREAM_CHANNELS", "TERM_TIMEOUT",
                  "TERM_CLIENT_CLOSE_TIMEOUT", "WORKERS")  # fmt: skip


class Proxy:
    """A proxy measured by the bench, on free ports: ours (`python -m amqproxy` from this repo's
    src/ or a baseline's) or an executable that takes the same command line (the reference)."""

    module = "amqproxy"  # the runner's --proxy-module changes it (e.g. to test the skip path)

    def __init__(
        self,
        upstream: str,
        ca: str | None = None,
        idle: float | None = None,
        src: str | None = None,
        binary: str | None = None,
        workers: int = 1,
    ) -> None:
        self.upstream = upstream
        self.workers = workers  # > 1: a supervisor and its workers (CPU: the process tree)
        self.ca = ca
        self.idle = idle
        self.src = src  # another checkout's src/ (A/B against a baseline), else this repo's
        self.binary = binary  # the reference's executable instead of python -m amqproxy
        # metrics it exports (None: all of ours); others read as None, never as 0
        self.known_metrics = REFERENCE_METRICS if binary else None
        self.port = 0
        self.http_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = ""

    @staticmethod
    def available() -> tuple[bool, str]:
        """Does `python -m amqproxy --help` work?"""
        try:
            r = subprocess.run(
                [sys.executable, "-m", Proxy.module, "--help"],
                env=proxy_env(),
                capture_output=True,
                text=True,
                timeout=20,
            )
        except subprocess.TimeoutExpired:
            return False, f"python -m {Proxy.module} --help timed out"
        if r.returncode != 0:
            return False, (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        return True, ""

    def start(self, timeout: float = 15.0) -> Proxy:
        self.port, self.http_port = free_port(), free_port()
        exe = [self.binary] if self.binary else [sys.executable, "-m", Proxy.module]
        cmd = [
            *exe,
            "-l",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-b",
            str(self.http_port),
        ]
        if self.idle is not None:
            cmd += ["-t", str(self.idle)]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        cmd.append(self.upstream)
        env = proxy_env(self.src)
        if self.ca:
            env["AMQPROXY_UPSTREAM_CA"] = self.ca
            env["SSL_CERT_FILE"] = self.ca  # the reference trusts OpenSSL's default paths
        os.makedirs(RESULTS_DIR, exist_ok=True)
        tag = re.sub(r"[^A-Za-z0-9]+", "_", self.upstream)
        tag = f"{tag}-ref" if self.binary else tag
        self.log_path = os.path.join(RESULTS_DIR, f"proxy-{tag}-{self.port}.log")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        ok = wait_port(self.port, timeout, self.proc) and wait_port(self.http_port, 5, self.proc)
        ok = ok and self._workers_ready(timeout)
        if not ok:
            tail = self.log_tail()
            self.stop()
            raise ProxyUnavailable(f"proxy did not start ({' '.join(cmd)}): {tail}")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _workers_ready(self, timeout: float) -> bool:
        """With --workers: every worker listens (the port answers as soon as one does)."""
        if self.workers <= 1:
            return True
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        while time.monotonic() < deadline and self.alive():
            with contextlib.suppress(OSError, ValueError, KeyError):
                with urllib.request.urlopen(url, timeout=2) as r:
                    if json.loads(r.read())["workers"]["ready"] == self.workers:
                        return True
            time.sleep(0.1)
        return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 5) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-n:])
        return ""

    def frame_scanner(self) -> str:
        """Which frame scanner the proxy runs ("compiled" or "pure Python"), from its log."""
        if self.binary:
            return "n/a"
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            for line in f:
                if "frame scanner: " in line:
                    return line.rsplit("frame scanner: ", 1)[1].strip()
        return "unknown"

    def metrics(self) -> dict[str, float]:
        """Prometheus text from /metrics, summed per metric name over all label sets."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=3) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
            if m:
                with contextlib.suppress(ValueError):
                    out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        return out

    def metric(self, name: str) -> float | None:
        """Sum of one metric; 0 if not exported yet (no label set), None if unreachable or
        if this proxy never exports it (the reference has three metrics)."""
        if self.known_metrics is not None and name not in self.known_metrics:
            return None
        try:
            return self.metrics().get(name, 0.0)
        except Exception:
            return None

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
        self.proc = None


def proxy_env(src: str | None = None) -> dict[str, str]:
    """The environment to run `python -m amqproxy` from `src` (this repo's src/ by default)."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_ENV_VARS}
    src = src or os.path.join(REPO_DIR, "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def baseline_src(ref: str) -> str:
    """src/ of a checkout of `ref` (a git worktree under bench/results, C scanner built in
    place), for A/B runs of this proxy against an earlier version of itself."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", ref],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    tree = os.path.join(RESULTS_DIR, f"baseline-{sha}")
    if not os.path.isdir(tree):
        subprocess.run(
            ["git", "worktree", "add", "--detach", tree, sha],
            cwd=REPO_DIR,
            check=True,
            capture_output=True,
        )
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, capture_output=True
    )
    return os.path.join(tree, "src")


PEERS_DIR = os.path.normpath(os.path.join(REPO_DIR, "..", "shared", "peers"))
REFERENCE_VERSION = "3.1.3"


def build_reference(script: str | None = None, timeout: float = 900) -> str:
    """Path of the reference proxy (cloudamqp/amqproxy 3.1.3), built by the peers' script the
    first time (about a minute; the binary is cached). Raises RuntimeError with the reason."""
    script = script or os.path.join(PEERS_DIR, "build-amqproxy.sh")
    if not os.path.exists(script):
        raise RuntimeError(f"{script} not found")
    r = subprocess.run([script], capture_output=True, text=True, timeout=timeout)
    path = (r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode != 0 or not os.access(path, os.X_OK):
        tail = " | ".join(r.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"{script} failed (exit {r.returncode}): {tail}")
    return check_reference(path)


def check_reference(path: str) -> str:
    """`path` if it runs and says it is the expected version, else RuntimeError."""
    try:
        r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except OSError as e:
        raise RuntimeError(f"{path}: {e}") from None
    if r.returncode != 0:
        raise RuntimeError(f"{path} --version: exit {r.returncode}")
    if r.stdout.strip() != REFERENCE_VERSION:
        raise RuntimeError(f"{path} is version {r.stdout.strip()!r}, not {REFERENCE_VERSION}")
    return path


@dataclass(frozen=True)
class Kind:
    """One proxy measured beside direct: ours ("proxy"), the reference (cloudamqp/amqproxy,
    "reference") or an earlier version of ours ("baseline"). The name is the run's mode."""

    name: str
    binary: str | None = None  # the reference's executable
    src: str | None = None  # the baseline's src/
    workers: int = 1  # ours with --workers N ("proxy-2w")

    def proxy(self, upstream: str, ca: str | None = None, idle: float | None = None) -> Proxy:
        return Proxy(
            upstream, ca=ca, idle=idle, src=self.src, binary=self.binary, workers=self.workers
        )


class Socat:
    """A plain TCP relay (`socat ... fork`): the floor any proxy can reach."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Socat:
        if shutil.which("socat") is None:
            raise RuntimeError("socat not installed")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                "socat",
                f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,nodelay,backlog=1024",
                f"TCP:127.0.0.1:{self.target_port},nodelay",
            ],
            stderr=subprocess.DEVNULL,
        )
        if not wait_port(self.port, 5, self.proc):
            self.stop()
            raise RuntimeError("socat did not start")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

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
        self.proc = None


# -- broker administration -----------------------------------------------------------------


class Admin:
    """Direct (never proxied) pika connection to a broker for queue setup and checks."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: pika.BlockingConnection | None = None
        self.ch: Any = None

    def _channel(self) -> Any:
        if self.conn is None or self.conn.is_closed or self.ch is None or self.ch.is_closed:
            self.close()
            self.conn = pika.BlockingConnection(
                pika.ConnectionParameters("127.0.0.1", self.port, heartbeat=0)
            )
            self.ch = self.conn.channel()
        return self.ch

    def new_queue(self, scenario: str) -> str:
        name = f"amqproxy-bench-{scenario}-{uuid.uuid4().hex[:8]}"
        self._channel().queue_declare(name, durable=False, auto_delete=False)
        return name

    def count(self, queue: str) -> int:
        return int(self._channel().queue_declare(queue, passive=True).method.message_count)

    def settled_count(
        self, queue: str, expect: int, timeout: float = 10.0, stable_s: float = 0.5
    ) -> int:
        """Message count once it equals `expect` or has stopped changing for `stable_s`."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            c = self.count(queue)
            if c == expect:
                return c
            if c != last:
                last, since = c, time.monotonic()
            elif time.monotonic() - since > stable_s:
                return c
            time.sleep(0.05)
        return last

    def delete(self, queue: str) -> None:
        with contextlib.suppress(Exception):
            self._channel().queue_delete(queue)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.conn is not None and self.conn.is_open:
                self.conn.close()
        self.conn = None
        self.ch = None


def verify_queue(
    admin: Admin,
    queue: str,
    expected: list[int],
    maybe: list[int] | None = None,
    delete: bool = True,
) -> dict[str, Any]:
    """Check the queue holds exactly the `expected` ids (plus any of `maybe`), then delete it.

    `maybe` holds ids whose publish may or may not have reached the broker (the client saw an
    error after sending it). Returns {"ok", "count", "missing", "duplicates", "unexpected"}.
    """
    import fastamqp

    try:
        count = admin.settled_count(queue, len(expected))
        got = (
            fastamqp.run(fastamqp.drain_ids("127.0.0.1", admin.port, queue, count)) if count else []
        )
        counts = Counter(got)
        exp = set(expected)
        missing = len(exp - counts.keys())
        dups = sum(c - 1 for c in counts.values() if c > 1)
        unexpected = len(counts.keys() - exp - set(maybe or ()))
        ok = missing == 0 and dups == 0 and unexpected == 0 and len(expected) == len(exp)
        return {
            "ok": ok,
            "count": count,
            "expected": len(expected),
            "missing": missing,
            "duplicates": dups,
            "unexpected": unexpected,
        }
    finally:
        if delete:
            admin.delete(queue)
