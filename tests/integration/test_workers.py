"""--workers N: N proxy processes share the listen port (SO_REUSEPORT) under a supervisor that
restarts a worker that dies, forwards SIGTERM (every worker drains) and SIGHUP (every worker
reloads), and serves the HTTP port for the whole proxy (sums, a `worker` label or field,
client ids "W-ID" that route a close to its worker)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pika
import pytest
import trustme
from support import BROKER_URL, Proxy, drain, free_port, run_proxy_cli, wait_for
from support.proxy import proxy_env, tls_params
from support.util import Metrics

ACCEPTED = "amqproxy_worker_client_connections_accepted_total"


def two_workers(factory, *args: str) -> Proxy:
    """A proxy with --workers 2, once both workers listen and are ready (the port answers
    as soon as one does)."""
    p = factory("--workers", "2", *args)
    wait_for(
        lambda: p.get_json("/readyz")["workers"]["ready"] == 2,
        15,
        message=lambda: f"workers not ready: {p.get_json('/healthz')['workers']}",
    )
    return p


def publish_once(p: Proxy, tenant, queue: str, body: bytes) -> None:
    """One short-lived publisher: connect, publish, close (CloseOk: the proxy has it)."""
    conn = p.connect(tenant)
    conn.channel().basic_publish("", queue, body)
    conn.close()


def post(p: Proxy, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(f"http://{p.host}:{p.http_port}{path}", data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def accepted(p: Proxy) -> dict[str, float]:
    """Client connections each worker accepted, by worker number (as a label)."""
    metrics = p.metrics()
    return {labels["worker"]: v for n, labels, v in metrics.samples if n == ACCEPTED}


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.timeout(90)
def test_short_clients_spread_over_both_workers_and_metrics_sum_them(proxy_factory, tenant, queues):
    p = two_workers(proxy_factory, "-t", "60")
    q = queues.declare(tenant)
    assert set(p.worker_pids()) == {1, 2} and all(p.worker_pids().values())
    before = sum(accepted(p).values())  # wait_ready's probe of the port counts too
    n = 60
    for i in range(n):
        publish_once(p, tenant, q, f"m{i}".encode())

    assert sorted(b for b, _, _ in drain(tenant, q)) == sorted(f"m{i}".encode() for i in range(n))
    per_worker = accepted(p)
    assert sum(per_worker.values()) - before == n
    assert per_worker["1"] > 0 and per_worker["2"] > 0, per_worker  # the kernel spread them
    metrics = p.metrics()
    assert metrics.get("amqproxy_messages_published_total", vhost=tenant.vhost) == n
    assert metrics.get("amqproxy_client_connections_accepted_total") - before == n
    assert metrics.get("amqproxy_worker_up", worker="1") == 1
    assert metrics.get("amqproxy_worker_up", worker="2") == 1
    assert metrics.get("amqproxy_workers_alive") == 2
    # one pool row per user and vhost, whichever workers served it
    pools = p.get_json("/api/pools")["pools"]
    rows = [r for r in pools if r["vhost"] == tenant.vhost]
    assert len(rows) == 1 and rows[0]["messages_in"] == n
    assert rows[0]["upstream_connections"] == 2  # one per worker: each has its own pools
    nodes = p.get_json("/api/nodes")["nodes"]  # the broker as each worker sees it, one row
    assert len(nodes) == 1 and nodes[0]["workers"] == {"1": "reachable", "2": "reachable"}


@pytest.mark.timeout(90)
def test_clients_listed_with_their_worker_and_a_close_reaches_the_right_one(proxy_factory, tenant):
    p = two_workers(proxy_factory, "-t", "60")
    held = {}
    for i in range(12):  # enough that both workers hold some (one chance in 2048 they do not)
        name = f"held-{i}"
        held[name] = p.connect(tenant, client_properties={"connection_name": name})
        held[name].channel()
    rows = p.get_json("/api/clients")["clients"]
    assert {row["worker"] for row in rows} == {1, 2}
    assert len({row["id"] for row in rows}) == len(rows) == 12
    assert all(row["id"].startswith(f"{row['worker']}-") for row in rows)
    upstreams = p.get_json("/api/upstreams")["upstreams"]
    assert {row["worker"] for row in upstreams} == {1, 2}

    victim = next(row for row in rows if row["worker"] == 2)
    status, body = post(p, f"/api/clients/{victim['id']}/close", {"reason": "test closes it"})
    assert status == 200 and body["id"] == victim["id"] and body["closed"] is True
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        for _ in range(100):
            held[victim["connection_name"]].process_data_events(time_limit=0.05)
    assert closed.value.reply_text == "CONNECTION_FORCED - test closes it"
    assert all(c.is_open for name, c in held.items() if name != victim["connection_name"])
    assert post(p, "/api/clients/2-999999/close")[0] == 404
    assert post(p, f"/api/clients/{victim['id'].split('-')[1]}/close")[0] == 404  # no worker

    status, body = post(p, "/api/pause")
    assert status == 200 and body["paused"] is True and body["workers"] == 2
    health = p.get_json("/readyz")
    assert health["ready"] is False and health["status"] == "paused"
    assert post(p, "/api/resume")[1]["paused"] is False
    wait_for(lambda: p.get_json("/readyz")["ready"], 5)
    for conn in held.values():
        if conn.is_open:
            conn.close()


@pytest.mark.timeout(90)
def test_a_killed_worker_is_restarted_while_the_other_serves(proxy_factory, tenant, queues):
    p = two_workers(proxy_factory, "-t", "60")
    q = queues.declare(tenant)
    first = p.worker_pids()
    # a client that stays connected on worker 2 through worker 1's death
    for i in range(20):
        stayer = p.connect(tenant, client_properties={"connection_name": f"stayer-{i}"})
        rows = p.get_json("/api/clients")["clients"]
        if any(r["worker"] == 2 and r["connection_name"] == f"stayer-{i}" for r in rows):
            break
        stayer.close()
    channel = stayer.channel()
    channel.confirm_delivery()

    total = "amqproxy_client_connections_accepted_total"
    counted = p.metric(total)  # this scrape is what the supervisor keeps of worker 1's counts
    os.kill(first[1], signal.SIGKILL)
    wait_for(lambda: pid_gone(first[1]) or None, 5, message="worker 1 did not die")
    # the supervisor restarts a worker that died this young after 0.5 s: meanwhile (and
    # after) every new client is served, by worker 2 while worker 1 is down
    served_by_2 = accepted(p)["2"]
    for i in range(10):
        publish_once(p, tenant, q, f"during-{i}".encode())
    channel.basic_publish("", q, b"stayer")  # confirmed by the broker: worker 2 is untouched

    now = wait_for(
        lambda: (pids := p.worker_pids())[1] not in (None, first[1]) and pids,
        10,
        message="worker 1 was not restarted",
    )
    assert now[2] == first[2]
    wait_for(lambda: p.get_json("/readyz")["workers"]["ready"] == 2, 10)
    row = next(r for r in p.get_json("/healthz")["workers"]["list"] if r["worker"] == 1)
    assert row["restarts"] == 1 and row["last_exit"] == "killed by SIGKILL"
    assert p.metric("amqproxy_worker_restarts_total", worker="1") == 1
    assert f"worker 1 (pid {first[1]}) died after" in p.log()
    assert "killed by SIGKILL; restarting it in" in p.log()
    assert accepted(p)["2"] > served_by_2
    assert p.metric(total) >= counted + 10  # the sum does not go down with worker 1's restart
    for i in range(20):
        publish_once(p, tenant, q, f"after-{i}".encode())
    assert accepted(p)["1"] > 0  # the new worker 1 takes clients again

    stayer.close()
    got = sorted(b for b, _, _ in drain(tenant, q))
    want = [b"stayer", *(f"during-{i}".encode() for i in range(10))]
    want += [f"after-{i}".encode() for i in range(20)]
    assert got == sorted(want)

    # killed again soon after its restart: the supervisor waits longer before the next one
    os.kill(now[1], signal.SIGKILL)
    wait_for(lambda: p.worker_pids()[1] not in (None, now[1]), 15)
    delays = re.findall(r"worker 1 \(pid \d+\) died after .*restarting it in ([\d.]+) s", p.log())
    assert len(delays) == 2 and float(delays[1]) > float(delays[0]), delays


@pytest.mark.timeout(90)
def test_sigterm_drains_every_worker_and_loses_no_handed_over_message(
    proxy_factory, tenant, queues
):
    p = two_workers(
        proxy_factory, "-t", "60", "--term-client-close-timeout", "1", "--term-timeout", "5"
    )
    q = queues.declare(tenant)
    pids = list(p.worker_pids().values())
    handed_over: list[bytes] = []
    stop = threading.Event()
    started = threading.Barrier(5)

    def loop(n: int) -> None:
        started.wait(10)
        i = 0
        while not stop.is_set():
            body = f"{n}-{i}".encode()
            try:
                publish_once(p, tenant, q, body)
            except Exception:  # the proxy stopped accepting or closed us: the loop ends
                return
            handed_over.append(body)  # the client got CloseOk
            i += 1

    threads = [threading.Thread(target=loop, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    started.wait(10)
    wait_for(lambda: len(handed_over) >= 40, 20, message="publishers did not get going")
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc = p.wait_exit(timeout=30)
    stop.set()
    for thread in threads:
        thread.join(20)
    assert rc == 0, p.log_tail()
    assert time.monotonic() - t0 < 10
    assert all(pid_gone(pid) for pid in pids)
    log = p.log()
    assert "[worker 1] amqproxy.server: SIGTERM received: draining" in log
    assert "[worker 2] amqproxy.server: SIGTERM received: draining" in log
    assert "supervisor stopped (workers: exit status 0, exit status 0)" in log
    got = {b for b, _, _ in drain(tenant, q)}
    missing = [body for body in handed_over if body not in got]
    assert not missing, f"{len(missing)} of {len(handed_over)} handed-over messages lost"


@pytest.mark.timeout(90)
def test_sighup_reaches_every_worker(proxy_factory, tmp_path: Path, tenant):
    ini = tmp_path / f"amqproxy-{uuid.uuid4().hex[:6]}.ini"
    p = Proxy(["-c", str(ini)], None, ini.with_suffix(".log"), None, False)
    p.port, p.http_port = free_port(), free_port()

    def write(max_clients: int) -> None:
        ini.write_text(
            f"[main]\nupstream = {BROKER_URL}\nworkers = 2\nmax_clients = {max_clients}\n"
            f"idle_connection_timeout = 60\n[listen]\naddress = 127.0.0.1\n"
            f"port = {p.port}\nhttp_port = {p.http_port}\n"
        )

    write(0)
    proxy_factory.started.append(p)
    p.start()
    wait_for(lambda: p.get_json("/readyz")["workers"]["ready"] == 2, 15)
    write(1)
    p.send_signal(signal.SIGHUP)
    for worker in (1, 2):
        wait_for(
            lambda w=worker: f"[worker {w}] amqproxy.server: reload: max_clients 0 -> 1" in p.log(),
            10,
            message=f"worker {worker} did not reload",
        )
    # each worker now serves one client at most: of six, at most two are admitted
    admitted, refused = [], 0
    for _ in range(6):
        try:
            conn = p.connect(tenant)
            conn.channel()
            admitted.append(conn)
        except pika.exceptions.AMQPError:
            refused += 1
    assert len(admitted) <= 2 and refused >= 4
    assert p.metric("amqproxy_client_connections_refused_total") == refused
    for conn in admitted:
        conn.close()


def test_a_taken_port_fails_at_once_with_the_usual_message():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        result = run_proxy_cli(
            ["--workers", "2", "-l", "127.0.0.1", "-p", str(port), "-b", str(free_port()),
             BROKER_URL]
        )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot listen for AMQP on port {port} (-p/--port): Address already in use" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr and time.monotonic() - t0 < 10


def test_metrics_text_parses_as_prometheus(proxy_factory):
    p = two_workers(proxy_factory)
    text = p.http_get("/metrics")[1]
    names = {name for name, _, _ in Metrics(text).samples}
    assert {"amqproxy_workers", "amqproxy_worker_up", "amqproxy_worker_restarts_total"} <= names


@pytest.mark.timeout(90)
def test_tls_port_is_shared_by_the_workers_too(proxy_factory, tmp_path: Path, tenant, queues):
    ca = trustme.CA()
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    tls_port = free_port()
    p = two_workers(
        proxy_factory, "-t", "60", "--tls-port", str(tls_port), "--tls-cert", str(cert),
        "--tls-key", str(key),
    )  # fmt: skip
    q = queues.declare(tenant)
    before = accepted(p)
    params = tls_params(tls_port, tenant, context)
    for i in range(16):
        with pika.BlockingConnection(params) as conn:
            conn.channel().basic_publish("", q, f"tls-{i}".encode())
    after = accepted(p)
    assert all(after[w] > before[w] for w in ("1", "2")), (before, after)
    assert len(drain(tenant, q)) == 16


def test_status_command_works_against_the_supervisor(proxy_factory, tenant):
    p = two_workers(proxy_factory, "-t", "60")
    conn = p.connect(tenant, client_properties={"connection_name": "status-w"})
    conn.channel()
    url = f"http://{p.host}:{p.http_port}"
    result = subprocess.run(
        [sys.executable, "-m", "amqproxy", "status", "--clients", "--url", url],
        env=proxy_env(),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"amqproxy at {url}: ready"
    row = next(line for line in lines if "status-w" in line)
    assert row.split()[0] in ("1-1", "2-1", "1-2", "2-2") and " open " in row
    conn.close()
