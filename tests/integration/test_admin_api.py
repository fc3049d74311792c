"""The admin API and ``amqproxy status``: what an operator reads of the pools, clients and
upstream connections (with real pika clients connected), closing one client, pausing and
resuming admission, the token of the write endpoints, and the HTTP server's address. No
password ever appears in any answer."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pika
import pytest
from support import free_port, reply_code_of, run_proxy_cli, wait_for
from support.proxy import proxy_env
from support.util import ROOT

ENDPOINTS = ("/api/pools", "/api/clients", "/api/upstreams", "/healthz", "/readyz", "/metrics")


def http(p, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    """(status, JSON body) of one request to the proxy's HTTP port."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{p.host}:{p.http_port}{path}", data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def status_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amqproxy", "status", *args],
        env=proxy_env(),
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )


def row_of(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [row for row in rows if all(row.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


def client_id(p, name: str) -> int:
    _, body = http(p, "GET", "/api/clients")
    return int(row_of(body["clients"], connection_name=name)["id"])


@pytest.mark.timeout(60)
def test_pools_clients_and_upstreams_with_real_clients_and_no_password(
    proxy_factory, tenant, queues
):
    p = proxy_factory("-t", "60")
    q = queues.declare(tenant)
    app = p.connect(tenant, client_properties={"connection_name": "api-app-1"})
    ch = app.channel()
    ch.confirm_delivery()
    for _ in range(5):
        ch.basic_publish("", q, b"m" * 100)
    assert ch.basic_get(q, auto_ack=True)[0] is not None
    second = p.connect(tenant, client_properties={"connection_name": "api-app-2"})

    _, before = http(p, "GET", "/api/clients")
    _, pools = http(p, "GET", "/api/pools")
    _, clients = http(p, "GET", "/api/clients")
    pool = row_of(pools["pools"], user=tenant.user, vhost=tenant.vhost)
    assert pool["clients"] == 2
    assert pool["upstream_connections"] == 1
    assert pool["channels"]["leased"] == 1
    assert (pool["messages_in"], pool["messages_out"]) == (5, 1)
    assert pool["bytes_in"] > 500 and pool["bytes_out"] > 100
    assert pool["outbox"]["messages"] == 0

    mine = row_of(clients["clients"], connection_name="api-app-1")
    assert (mine["user"], mine["vhost"], mine["state"], mine["channels"]) == (
        tenant.user, tenant.vhost, "open", 1,
    )  # fmt: skip
    assert mine["address"].startswith("127.0.0.1:") and mine["connected_since"].endswith("Z")
    assert mine["bytes_in"] > 500 and mine["bytes_out"] > 100
    other = row_of(clients["clients"], connection_name="api-app-2")
    assert other["id"] != mine["id"] and other["channels"] == 0
    # The pool's totals are its clients' bytes, handshakes included (read between two looks
    # at the clients: a heartbeat may pass meanwhile).
    for key in ("bytes_in", "bytes_out"):
        low, high = (sum(row[key] for row in look["clients"]) for look in (before, clients))
        assert low <= pool[key] <= high, key

    _, upstreams = http(p, "GET", "/api/upstreams")
    up = row_of(upstreams["upstreams"], pool=f"{tenant.user}@{tenant.vhost}")
    assert up["node"] == f"127.0.0.1:{tenant.port}" and up["open"] is True
    assert up["role"] == "publish"  # where Channel.Open lands (consumers move: test_split.py)
    assert up["leased"] == 1 and up["channels"] >= 1
    assert 0 <= up["last_heartbeat_seconds"] < 30 and up["age_seconds"] >= 0

    for path in ENDPOINTS:
        status, text = p.http_get(path)
        assert status == 200, (path, text)
        assert tenant.password not in text, path  # a random one: it cannot appear by chance

    # Totals survive the clients that made them.
    app.close()
    second.close()
    wait_for(lambda: not http(p, "GET", "/api/clients")[1]["clients"], 5)
    _, pools = http(p, "GET", "/api/pools")
    pool = row_of(pools["pools"], user=tenant.user, vhost=tenant.vhost)
    assert (pool["clients"], pool["messages_in"], pool["messages_out"]) == (0, 5, 1)


@pytest.mark.timeout(60)
def test_close_one_client_with_320_and_a_reason(proxy, tenant, queues):
    q = queues.declare(tenant)
    victim = proxy.connect(tenant, client_properties={"connection_name": "to-close"})
    victim.channel()
    bystander = proxy.connect(tenant, client_properties={"connection_name": "stays"})
    ch = bystander.channel()
    ch.confirm_delivery()

    status, body = http(
        proxy, "POST", f"/api/clients/{client_id(proxy, 'to-close')}/close",
        {"reason": "app X redeploys"},
    )  # fmt: skip
    assert status == 200 and body["closed"] is True
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        for _ in range(100):
            victim.process_data_events(time_limit=0.05)
    assert closed.value.reply_code == 320
    assert closed.value.reply_text == "CONNECTION_FORCED - app X redeploys"

    ch.basic_publish("", q, b"still here")  # confirmed: the other client is untouched
    assert bystander.is_open
    bystander.close()

    status, body = http(proxy, "POST", "/api/clients/999999/close")
    assert status == 404 and "999999" in body["error"]
    status, body = http(proxy, "POST", "/api/clients/1/close", "not an object")
    assert status == 400


@pytest.mark.timeout(60)
def test_pause_refuses_new_clients_while_present_ones_keep_publishing(
    proxy_factory, tenant, queues
):
    p = proxy_factory("-t", "60")
    q = queues.declare(tenant)
    present = p.connect(tenant)
    ch = present.channel()
    ch.confirm_delivery()
    ch.basic_publish("", q, b"before")

    status, body = http(p, "POST", "/api/pause")
    assert (status, body["paused"]) == (200, True)
    with pytest.raises(pika.exceptions.AMQPConnectionError) as refused:
        p.connect(tenant)
    assert reply_code_of(refused.value) == 320
    assert "paused" in str(refused.value)
    for n in range(20):
        ch.basic_publish("", q, f"during {n}".encode())  # confirmed through the pause
    status, ready = http(p, "GET", "/readyz")
    assert status == 503 and ready["paused"] is True and ready["status"] == "paused"
    assert any("paused" in reason for reason in ready["reasons"])
    assert http(p, "GET", "/healthz")[0] == 200  # alive all the same
    shown = status_cli("--url", f"http://{p.host}:{p.http_port}")
    assert shown.returncode == 0 and "PAUSED" in shown.stdout and "NOT READY" in shown.stdout

    status, body = http(p, "POST", "/api/resume")
    assert (status, body["paused"]) == (200, False)
    assert http(p, "GET", "/readyz")[0] == 200
    later = p.connect(tenant)
    later.channel().basic_publish("", q, b"after")
    later.close()
    present.close()
    assert wait_for(lambda: "paused: new clients are refused" in p.log(), 5)


@pytest.mark.timeout(60)
def test_write_endpoints_need_the_token_when_one_is_set(proxy_factory):
    token = "tok-3f9c1e"
    p = proxy_factory("-t", "60", "--admin-token", token)
    for given in (None, "wrong-token"):
        status, body = http(p, "POST", "/api/pause", token=given)
        assert status == 401 and "Bearer" in body["error"]
    assert http(p, "GET", "/readyz")[1]["paused"] is False
    assert http(p, "GET", "/api/pools")[0] == 200  # reads stay open
    assert http(p, "POST", "/api/pause", token=token) == (200, {"paused": True, "clients": 0})
    assert http(p, "POST", "/api/resume", token=token)[0] == 200
    for path in ENDPOINTS:
        assert token not in p.http_get(path)[1]
    printed = run_proxy_cli(["--admin-token", token, "--print-config", "amqp://h"])
    assert printed.returncode == 0 and token not in printed.stdout
    assert json.loads(printed.stdout)["admin_token"] == "(set)"


def test_http_server_binds_the_listen_address_only(proxy):
    """The proxy runs with -l 127.0.0.1: another loopback address gets no answer."""
    assert proxy.http_get("/healthz")[0] == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", proxy.http_port), timeout=2).close()


@pytest.mark.timeout(60)
def test_status_command_prints_tables_and_json(proxy, tenant):
    app = proxy.connect(tenant, client_properties={"connection_name": "status-app"})
    app.channel()
    url = f"http://{proxy.host}:{proxy.http_port}"

    pools = status_cli("--url", url)
    assert pools.returncode == 0, pools.stderr
    lines = pools.stdout.splitlines()
    assert lines[0] == f"amqproxy at {url}: ready"
    header = next(line for line in lines if line.startswith("user "))
    assert header.split() == [
        "user", "vhost", "clients", "upstreams", "leased", "parked", "settling", "waiting",
        "msgs_in", "msgs_out", "bytes_in", "bytes_out", "outbox", "outbox_bytes",
    ]  # fmt: skip
    row = next(line for line in lines if line.split()[:2] == [tenant.user, tenant.vhost])
    assert row.split()[:5] == [tenant.user, tenant.vhost, "1", "1", "1"]
    # aligned: every column's last character is where its header's is (numbers to the right)
    assert row.index(" 1 ") + 2 == header.index("clients") + len("clients")

    clients = status_cli("--clients", "--url", url)
    assert clients.returncode == 0
    client_row = next(line for line in clients.stdout.splitlines() if "status-app" in line)
    assert tenant.user in client_row and " open " in client_row

    upstreams = status_cli("--upstreams", "--url", url)
    assert upstreams.returncode == 0
    assert f"{tenant.user}@{tenant.vhost}" in upstreams.stdout and "127.0.0.1:" in upstreams.stdout

    as_json = status_cli("--json", "--clients", "--url", url)
    data = json.loads(as_json.stdout)
    assert data["health"]["ready"] is True
    assert row_of(data["clients"], connection_name="status-app")["user"] == tenant.user
    app.close()

    nobody = status_cli("--url", f"http://127.0.0.1:{free_port()}")
    assert nobody.returncode == 1 and "cannot reach" in nobody.stderr
    assert "Traceback" not in nobody.stderr


@pytest.mark.timeout(60)
def test_clients_sending_the_same_bytes_as_the_last_ones_are_read_the_same(proxy, tenant, queues):
    """The proxy remembers what the last client-properties tables and Channel.Close payloads
    said (``amqp.recent``): pika clients that repeat them, byte for byte, are named and
    answered as the first one was, and one that differs is read on its own."""
    from support.broker import drain

    q = queues.declare(tenant)
    clients = []
    for n, name in enumerate(["same", "other", "same", "same"]):
        conn = proxy.connect(tenant, client_properties={"connection_name": name})
        ch = conn.channel()
        ch.basic_publish("", q, str(n).encode())
        ch.close()  # the same Channel.Close each time: CloseOk from what was decoded first
        assert ch.is_closed and conn.is_open
        clients.append(conn)
    try:
        _, body = http(proxy, "GET", "/api/clients")
        mine = [row for row in body["clients"] if row["user"] == tenant.user]
        names = sorted(row["connection_name"] for row in mine)
        assert names == ["other", "same", "same", "same"]
    finally:
        for conn in clients:
            conn.close()
    assert sorted(b for b, _, _ in drain(tenant, q)) == [b"0", b"1", b"2", b"3"]
