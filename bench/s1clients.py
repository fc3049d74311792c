"""S1 short-lived publisher clients: connect, open channel, publish one 100-byte message, close
channel, close connection — timed per cycle with real client libraries, because the cost being
measured is the client's own handshake pattern.

Every client returns (per-cycle ms, ids published, ids maybe published, error or None). The first
cycle is a warm-up and is dropped by the caller.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
from dataclasses import dataclass

from fastamqp import body_for

PHP_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "s1_publish.php")
CLIENTS = ("pika", "php-loop", "php-proc", "amqp-publish")
MIN_CYCLES = 4  # run at least this many cycles after the warm-up, whatever the time budget


@dataclass
class Target:
    """Where a client connects: host/port, and the CA when the client itself speaks TLS."""

    port: int
    host: str = "127.0.0.1"
    tls_ca: str | None = None


@dataclass
class S1Result:
    times_ms: list[float]
    ids: list[int]
    maybe_ids: list[int]
    error: str | None = None


def run_client(
    client: str, target: Target, queue: str, id_base: int, n_max: int, budget_s: float
) -> S1Result:
    fn = {
        "pika": pika_loop,
        "php-loop": php_loop,
        "php-proc": php_per_process,
        "amqp-publish": amqp_publish_per_process,
    }[client]
    return fn(target, queue, id_base, n_max, budget_s)


def pika_loop(target: Target, queue: str, id_base: int, n_max: int, budget_s: float) -> S1Result:
    """pika BlockingConnection, in this process."""
    import pika

    kw = {}
    if target.tls_ca:
        ctx = ssl.create_default_context(cafile=target.tls_ca)
        kw["ssl_options"] = pika.SSLOptions(ctx, "localhost")
    params = pika.ConnectionParameters(
        target.host, target.port, credentials=pika.PlainCredentials("guest", "guest"), **kw
    )
    res = S1Result([], [], [])
    start = time.monotonic()
    for i in range(n_max):
        if i > MIN_CYCLES and time.monotonic() - start > budget_s:
            break
        msg_id = id_base + i
        t0 = time.perf_counter()
        try:
            conn = pika.BlockingConnection(params)
            ch = conn.channel()
            ch.basic_publish("", queue, body_for(msg_id))
            ch.close()
            conn.close()
        except Exception as e:
            res.maybe_ids.append(msg_id)
            res.error = f"pika cycle {i}: {e!r}"[:300]
            break
        res.times_ms.append((time.perf_counter() - t0) * 1000)
        res.ids.append(msg_id)
    return res


def _php_cmd(target: Target, queue: str, id_base: int, n: int, budget_ms: float) -> list[str]:
    cmd = ["php", PHP_SCRIPT, target.host, str(target.port), "guest", "guest", "/", queue]
    cmd += [str(n), str(id_base), str(int(budget_ms))]
    if target.tls_ca:
        cmd.append(target.tls_ca)
    return cmd


def php_loop(target: Target, queue: str, id_base: int, n_max: int, budget_s: float) -> S1Result:
    """php-amqplib, all cycles in one php process (a long-running PHP worker)."""
    cmd = _php_cmd(target, queue, id_base, n_max, budget_s * 1000)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_s + 120)
    if r.returncode != 0:
        # which ids made it is unknown: all are "maybe"
        return S1Result([], [], list(range(id_base, id_base + n_max)), _err("php", r))
    times = json.loads(r.stdout.strip().splitlines()[-1])
    return S1Result(times, list(range(id_base, id_base + len(times))), [])


def _per_process(
    make_cmd: object, n_max: int, budget_s: float, id_base: int, name: str
) -> S1Result:
    res = S1Result([], [], [])
    start = time.monotonic()
    for i in range(n_max):
        if i > MIN_CYCLES and time.monotonic() - start > budget_s:
            break
        msg_id = id_base + i
        cmd = make_cmd(msg_id)  # type: ignore[operator]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        dt = (time.perf_counter() - t0) * 1000
        if r.returncode != 0:
            res.maybe_ids.append(msg_id)
            res.error = _err(name, r)
            break
        res.times_ms.append(dt)
        res.ids.append(msg_id)
    return res


def php_per_process(
    target: Target, queue: str, id_base: int, n_max: int, budget_s: float
) -> S1Result:
    """One `php` process per message (the PHP-FPM/CGI pattern); wall time of the process."""
    return _per_process(
        lambda msg_id: _php_cmd(target, queue, msg_id, 1, 0), n_max, budget_s, id_base, "php"
    )


def amqp_publish_per_process(
    target: Target, queue: str, id_base: int, n_max: int, budget_s: float
) -> S1Result:
    """rabbitmq-c `amqp-publish`, one process per message."""

    def cmd(msg_id: int) -> list[str]:
        # rabbitmq-c wants TLS spelled in the URL too; no path = the default vhost "/"
        scheme = "amqps" if target.tls_ca else "amqp"
        host = "localhost" if target.tls_ca else target.host  # the certificate's DNS name
        c = ["amqp-publish", "--url", f"{scheme}://guest:guest@{host}:{target.port}"]
        if target.tls_ca:
            c += ["--ssl", "--cacert", target.tls_ca]
        c += ["-e", "", "-r", queue, "-b", body_for(msg_id).decode()]
        return c

    return _per_process(cmd, n_max, budget_s, id_base, "amqp-publish")


def _err(name: str, r: subprocess.CompletedProcess[str]) -> str:
    tail = (r.stderr or r.stdout or "").strip().splitlines()[-3:]
    return f"{name} exit {r.returncode}: {' | '.join(tail)}"[:400]
