"""TLS: a listener for clients beside the plain one (--tls-port/--tls-cert/--tls-key), client
certificates (--tls-client-ca), and mutual TLS with the broker (--upstream-cert/--upstream-key)
with its certificate checked against the URL's host. Certificates come from ``trustme``; the
clients are pika, php-amqplib (tests/clients/php/driver.php) and raw TLS sockets where the exact
bytes matter; the broker for mutual TLS is a private node that requires a client certificate."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pika.exceptions
import pytest
import trustme
from support import BROKER_URL, ROOT, Proxy, Tenant, drain, free_port, run_proxy_cli, wait_for
from support.node import BrokerNode, listen_port
from support.proxy import tls_params

pytestmark = pytest.mark.timeout(90)

HEADER = b"AMQP\x00\x00\x09\x01"
PHP_DRIVER = ROOT / "tests" / "clients" / "php" / "driver.php"


@dataclass
class Pki:
    """Files of a CA the proxy's clients trust, the proxy's server certificate, a client's
    certificate from that CA and one from another CA."""

    ca: str
    server: tuple[str, str]  # (cert, key), for "localhost" and 127.0.0.1
    client: tuple[str, str]  # CN=app1, signed by ca
    stranger: tuple[str, str]  # CN=intruder, signed by another CA


def _write(directory: Path, name: str, cert: trustme.LeafCert) -> tuple[str, str]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return Pki(
        ca=str(d / "ca.pem"),
        server=_write(d, "server", ca.issue_cert("localhost", "127.0.0.1")),
        client=_write(d, "client", ca.issue_cert("app1.example", common_name="app1")),
        stranger=_write(
            d, "stranger", other.issue_cert("intruder.example", common_name="intruder")
        ),
    )


def tls_proxy(factory, pki: Pki, *args: str, upstream: str = BROKER_URL) -> tuple[Proxy, int]:
    port = free_port()
    cert, key = pki.server
    proxy = factory(
        "-t", "60", "--tls-port", str(port), "--tls-cert", cert, "--tls-key", key, *args,
        upstream=upstream,
    )  # fmt: skip
    return proxy, port


@pytest.fixture(scope="module")
def amqps(module_proxy_factory, pki: Pki) -> tuple[Proxy, int]:
    """TLS for anyone (no client certificate asked)."""
    return tls_proxy(module_proxy_factory, pki)


@pytest.fixture(scope="module")
def mutual(module_proxy_factory, pki: Pki) -> tuple[Proxy, int]:
    """TLS with client certificates required (--tls-client-ca)."""
    return tls_proxy(module_proxy_factory, pki, "--tls-client-ca", pki.ca)


def client_context(pki: Pki, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def round_trip(params: pika.ConnectionParameters, queue: str, body: bytes) -> bytes:
    """Publish with confirms, then Basic.Get it back on the same connection."""
    with pika.BlockingConnection(params) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", queue, body)
        got: list[bytes] = []

        def fetched() -> bool:
            _, _, data = ch.basic_get(queue, auto_ack=True)
            if data is not None:
                got.append(data)
            return bool(got)

        wait_for(fetched, 5)
        return got[0]


def amqp_start(port: int, context: ssl.SSLContext) -> bytes:
    """The first frame header the proxy sends a TLS client after its protocol header; b"" when
    the connection ends first. An error of the TLS layer (an alert) propagates."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as conn:
            conn.sendall(HEADER)
            return conn.recv(7)


def php(command: str, args: dict, timeout: float = 60.0) -> dict:
    exe = shutil.which("php")
    if exe is None or not Path("/usr/share/php/PhpAmqpLib").is_dir():
        pytest.fail("php-cli or php-amqplib missing: run tests/install.sh (CI does)")
    done = subprocess.run(
        [exe, str(PHP_DRIVER), command, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=str(PHP_DRIVER.parent),
    )
    assert done.returncode == 0, (
        f"php {command} failed: {done.stdout[-2000:]} {done.stderr[-3000:]}"
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def php_args(port: int, tenant: Tenant, tls: dict[str, str], **more: object) -> dict:
    return {
        "host": "127.0.0.1", "port": port, "user": tenant.user, "password": tenant.password,
        "vhost": tenant.vhost, "tls": {"peer_name": "localhost", **tls}, **more,
    }  # fmt: skip


# ---- serving clients over TLS ---------------------------------------------------------------


def test_pika_over_tls_and_the_plain_port_beside_it(amqps, pki, tenant, queues):
    proxy, port = amqps
    q = queues.declare(tenant)
    assert round_trip(tls_params(port, tenant, client_context(pki)), q, b"over tls") == b"over tls"
    assert round_trip(proxy.params(tenant.user, tenant.password, tenant.vhost), q, b"plain") == (
        b"plain"
    )
    # the TLS port speaks only TLS: a plain AMQP client there gets no Connection.Start
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(HEADER)
        assert raw.recv(64) == b""
    wait_for(lambda: "TLS handshake failed: not TLS" in proxy.log(), 5)


def test_php_amqplib_over_tls_bodies_round_trip(amqps, pki, tenant, queues):
    _, port = amqps
    q = queues.declare(tenant)
    sizes = [0, 1, 131065, 131066, 1024 * 1024]
    out = php("bodies", php_args(port, tenant, {"cafile": pki.ca}, q=q, sizes=sizes))

    def body_of(size: int, seed: int) -> bytes:  # the driver's bodies
        block = bytes((i * 7 + seed) & 0xFF for i in range(251))
        return (block * (size // 251 + 1))[:size]

    want = [[s, hashlib.sha256(body_of(s, i)).hexdigest()] for i, s in enumerate(sizes)]
    assert out["get"] == want and out["deliver"] == want


def test_the_listener_presents_the_configured_certificate(amqps, pki):
    """What a client verifies is --tls-cert; a client that trusts another CA refuses it."""
    _, port = amqps
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client_context(pki).wrap_socket(raw, server_hostname="localhost") as conn:
            presented = conn.getpeercert(binary_form=True)
    assert presented == ssl.PEM_cert_to_DER_cert(Path(pki.server[0]).read_text())
    context = ssl.create_default_context()
    trustme.CA().configure_trust(context)
    with pytest.raises(ssl.SSLCertVerificationError):
        amqp_start(port, context)


def test_first_bytes_in_the_packet_of_the_finished_message_are_not_lost(amqps, pki):
    """TLS 1.3: the client's Finished and its protocol header in one TCP write, so the proxy's
    TLS layer completes the handshake and has application data in the same read. The header
    must reach the client's session all the same (the answer is Connection.Start)."""
    _, port = amqps
    context = client_context(pki)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    raw.sendall(outgoing.read())
                data = raw.recv(65536)
                assert data, "the proxy closed during the handshake"
                incoming.write(data)
        tls.write(HEADER)  # now outgoing holds the Finished and the header: one write
        raw.sendall(outgoing.read())
        got = b""
        deadline = time.monotonic() + 10
        while len(got) < 7 and time.monotonic() < deadline:
            data = raw.recv(65536)
            assert data, "the proxy closed the connection instead of answering"
            incoming.write(data)
            try:
                got += tls.read(65536)
            except ssl.SSLWantReadError:
                continue
    frame_type, channel, _size = struct.unpack(">BHI", got[:7])
    assert (frame_type, channel) == (1, 0)  # a method frame on channel 0: Connection.Start


def test_silent_client_is_dropped_within_the_handshake_timeout(proxy_factory, pki):
    """A client that opens TCP on the TLS port and sends nothing (or half a ClientHello) is
    closed by --handshake-timeout, with one log line each; the listener keeps serving."""
    proxy, port = tls_proxy(proxy_factory, pki, "--handshake-timeout", "1")
    silent = socket.create_connection(("127.0.0.1", port), timeout=20)
    partial = socket.create_connection(("127.0.0.1", port), timeout=20)
    partial.sendall(b"\x16\x03\x01\x02\x00\x01")  # a handshake record header, then nothing
    started = time.monotonic()
    for sock in (silent, partial):
        with sock:
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
    assert time.monotonic() - started < 15  # 1 s asked; far below the 20 s socket timeout
    wait_for(lambda: proxy.log().count("no handshake within the handshake timeout") == 2, 5)
    assert amqp_start(port, client_context(pki))[:1] == b"\x01"


def test_sigterm_drains_tls_clients_and_closes_the_tls_port(proxy_factory, pki, tenant):
    """The drain covers the TLS listener: no new TLS connection, a connected TLS client gets
    Connection.Close 320, the proxy exits 0 (and its log has no traceback)."""
    proxy, port = tls_proxy(
        proxy_factory, pki, "--term-client-close-timeout", "0.5", "--term-timeout", "2"
    )
    conn = pika.BlockingConnection(tls_params(port, tenant, client_context(pki)))
    conn.channel()
    proxy.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_for(refused, 5)
    with pytest.raises(pika.exceptions.ConnectionClosed) as err:
        conn.process_data_events(time_limit=10)
    assert "320" in str(err.value)
    assert proxy.wait_exit(15) == 0


# ---- client certificates ------------------------------------------------------------------


def test_client_certificate_from_the_ca_is_admitted_and_named_in_the_log(
    mutual, pki, tenant, queues
):
    proxy, port = mutual
    q = queues.declare(tenant)
    params = tls_params(port, tenant, client_context(pki, pki.client))
    assert round_trip(params, q, b"with a certificate") == b"with a certificate"
    wait_for(lambda: "CN=app1]" in proxy.log(), 5)
    line = next(x for x in proxy.log().splitlines() if "CN=app1]" in x)
    assert f"{tenant.user}@{tenant.vhost} from 127.0.0.1:" in line


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
def test_client_without_an_accepted_certificate_is_refused_at_the_handshake(
    mutual, pki, tenant, queues, who
):
    proxy, port = mutual
    cert = None if who == "no certificate" else pki.stranger
    before = proxy.log().count("TLS handshake failed")
    # TLS 1.3: the client finishes its side first; the proxy's alert comes with the first read.
    # Either way it never gets to AMQP.
    try:
        got = amqp_start(port, client_context(pki, cert))
    except (ssl.SSLError, ConnectionResetError):
        got = b""
    assert got == b""
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(tls_params(port, tenant, client_context(pki, cert)))
    wait_for(lambda: proxy.log().count("TLS handshake failed") >= before + 2, 5)
    reason = "did not return a certificate" if cert is None else "certificate verify failed"
    assert reason in proxy.log()
    # the plain port is not affected by --tls-client-ca
    q = queues.declare(tenant)
    assert round_trip(proxy.params(tenant.user, tenant.password, tenant.vhost), q, b"p") == b"p"


def test_php_amqplib_with_a_client_certificate(mutual, pki, tenant, queues):
    """Admitted with a certificate from the CA; without one, refused in the handshake (php
    reports a closed connection) and nothing is published."""
    proxy, port = mutual
    q = queues.declare(tenant)
    cert, key = pki.client
    tls = {"cafile": pki.ca, "cert": cert, "key": key}
    assert php("publish_one", php_args(port, tenant, tls, q=q, body="php-mtls")) == {"ok": True}
    assert [b for b, _, _ in drain(tenant, q)] == [b"php-mtls"]
    refusals = proxy.log().count("did not return a certificate")
    with pytest.raises(AssertionError, match="php publish_one failed"):
        php("publish_one", php_args(port, tenant, {"cafile": pki.ca}, q=q, body="no"), timeout=30)
    wait_for(lambda: proxy.log().count("did not return a certificate") == refusals + 1, 5)
    assert drain(tenant, q) == []


# ---- the broker over mutual TLS -------------------------------------------------------------


@dataclass
class MutualNode:
    node: BrokerNode
    ca: str  # the node's CA: it signed the node's certificate and the proxy's
    proxy_cert: tuple[str, str]  # CN=amqproxy-upstream

    @property
    def guest(self) -> Tenant:
        return Tenant("guest", "guest", "/", self.node.plain_port)

    def url(self, host: str) -> str:
        return f"amqps://{host}:{self.node.tls_port}"


@pytest.fixture(scope="module")
def mutual_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MutualNode]:
    """A private node whose TLS listener requires a client certificate from its CA. Its own
    certificate names "localhost" only: amqps://127.0.0.1 is a name it does not have."""
    d = tmp_path_factory.mktemp("node-pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    cert, key = _write(d, "node", ca.issue_cert("localhost"))
    proxy_cert = _write(d, "proxy", ca.issue_cert("amqproxy.example", common_name="amqproxy-up"))
    node = BrokerNode(
        f"amqproxy-tls-{os.getpid()}@localhost",
        tls_port=listen_port(),
        certs={"ca": str(d / "ca.pem"), "cert": cert, "key": key},
        verify_peer=True,
    ).start()
    try:
        yield MutualNode(node, str(d / "ca.pem"), proxy_cert)
    finally:
        node.stop()


def upstream_args(mn: MutualNode, with_cert: bool = True) -> list[str]:
    args = ["--upstream-ca", mn.ca, "--outbox-hold", "0"]
    if with_cert:
        args += ["--upstream-cert", mn.proxy_cert[0], "--upstream-key", mn.proxy_cert[1]]
    return args


def refused_with(proxy: Proxy) -> str:
    """What a client that connects through ``proxy`` is closed with (pika's words)."""
    with pytest.raises(pika.exceptions.AMQPConnectionError) as err:
        pika.BlockingConnection(proxy.params())
    return str(err.value)


def test_upstream_mutual_tls_presents_the_proxy_certificate(proxy_factory, mutual_node):
    mn = mutual_node
    proxy = proxy_factory("-t", "60", *upstream_args(mn), upstream=mn.url("localhost"))
    with pika.BlockingConnection(proxy.params()) as conn:
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.confirm_delivery()
        ch.basic_publish("", q, b"via mutual tls")
        assert ch.basic_get(q, auto_ack=True)[2] == b"via mutual tls"
        listed = mn.node.ctl("list_connections", "ssl", "peer_cert_subject", "--no-table-headers")
    assert listed.returncode == 0, listed.stderr
    assert "true" in listed.stdout and "CN=amqproxy-up" in listed.stdout


def test_upstream_without_a_client_certificate_fails_cleanly(proxy_factory, mutual_node):
    mn = mutual_node
    proxy = proxy_factory(
        *upstream_args(mn, with_cert=False), upstream=mn.url("localhost"), healthz=False
    )
    text = refused_with(proxy)
    assert "(320) 'CONNECTION_FORCED - " in text and "certificate required" in text, text
    assert "TLS" in text and "_ssl.c" not in text

    # The operator gets one WARNING per outage, naming the first failure seen: the client's
    # connect ("certificate required") or the broker check started with the proxy, which under
    # TLS 1.3 may only see the connection reset that follows the broker's alert.
    def warned() -> list[str]:
        lines = [line for line in proxy.log().splitlines() if "WARNING amqproxy.broker" in line]
        return [line for line in lines if "broker unreachable" in line]

    lines = wait_for(warned, 5)
    assert len(lines) == 1 and "_ssl.c" not in lines[0], lines
    assert "certificate required" in lines[0] or "reset" in lines[0], lines


def test_upstream_certificate_for_another_name_is_refused(proxy_factory, mutual_node):
    """amqps://127.0.0.1: the node's certificate (from a CA the proxy trusts) names only
    localhost; the proxy refuses it and the client gets a clean 320 saying why."""
    mn = mutual_node
    proxy = proxy_factory(*upstream_args(mn), upstream=mn.url("127.0.0.1"), healthz=False)
    text = refused_with(proxy)
    assert "(320) " in text and "CONNECTION_FORCED - " in text, text
    assert "broker certificate not accepted" in text and "127.0.0.1" in text, text
    wait_for(lambda: "broker certificate not accepted: IP address mismatch" in proxy.log(), 5)


# ---- bad files --------------------------------------------------------------------------------


def test_bad_files_exit_2_with_one_line_naming_the_setting_and_the_path(pki, tmp_path):
    cert, key = pki.server
    missing = str(tmp_path / "missing.pem")
    amqps_url = "amqps://localhost:5671"
    cases = [
        (["--tls-cert", missing, "--tls-key", key], {}, "--tls-cert", missing),
        (["--tls-cert", cert, "--tls-key", pki.stranger[1]], {}, "--tls-key", pki.stranger[1]),
        (["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", missing], {},
         "--tls-client-ca", missing),
        ([amqps_url, "--upstream-cert", missing, "--upstream-key", key], {},
         "--upstream-cert", missing),
        ([amqps_url, "--upstream-ca", missing], {}, "--upstream-ca", missing),
        ([], {"AMQPROXY_TLS_CERT": cert, "AMQPROXY_TLS_KEY": missing}, "AMQPROXY_TLS_KEY", missing),
    ]  # fmt: skip
    for args, env, setting, path in cases:
        argv = ["-p", str(free_port()), "-b", "0", *args]
        if not any(a.startswith("amqp") for a in args):
            argv.append(BROKER_URL)
        done = run_proxy_cli(argv, env=env)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (args, done.stderr)
        assert len(lines) == 1 and setting in lines[0] and path in lines[0], (args, lines)
        assert "Traceback" not in done.stderr


def test_tls_settings_that_do_nothing_are_named_as_ignored(proxy_factory, pki):
    proxy = proxy_factory("--upstream-ca", pki.ca, "--tls-port", str(free_port()))
    wait_for(lambda: "--upstream-ca ignored: the upstream URL is amqp://" in proxy.log(), 5)
    assert "--tls-port ignored: no TLS listener without --tls-cert" in proxy.log()
