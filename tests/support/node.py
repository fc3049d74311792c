"""Private RabbitMQ nodes for tests and benchmarks that must stop, restart or reconfigure a
broker: never the shared one on 5672 (rabbit@localhost).

Each node has its own name, data, log and config directories under a temporary directory, its
own HOME and Erlang cookie, its own AMQP (and optionally TLS) and distribution ports, and no
plugins. ``bench/tlsbroker.py`` runs one with a TLS listener by hand. ``BrokerCluster`` starts
several in parallel with one Erlang cookie and clusters them.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from ipaddress import IPv4Address

RABBIT_BIN = "/usr/lib/rabbitmq/bin"


def make_certs(directory: str) -> dict[str, str]:
    """Write ca.pem, server.pem, server.key into `directory`; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "amqproxy bench CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca": os.path.join(directory, "ca.pem"),
        "cert": os.path.join(directory, "server.pem"),
        "key": os.path.join(directory, "server.key"),
    }
    with open(paths["ca"], "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.chmod(paths["key"], 0o600)
    return paths


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (32768 by default)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def listen_port() -> int:
    """A free port below the ephemeral range: a node takes seconds to bind its ports, and a
    port from the ephemeral range can meanwhile become the local end of any outgoing
    connection of the tests (the node then exits with eaddrinuse)."""
    high = _ephemeral_low() - 1
    for _ in range(200):
        port = random.randint(max(1024, high - 12000), high)
        if port not in _GIVEN and _port_free(port):
            _GIVEN.add(port)
            return port
    raise RuntimeError("no free port below the ephemeral range")


_GIVEN: set[int] = set()  # ports handed out in this run, never twice


def _port_free(port: int) -> bool:
    """True unless something listens there (TIME_WAIT leftovers of a previous run are fine)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class BrokerNode:
    """Start/stop a private RabbitMQ node; never addresses rabbit@localhost.

    ``tls_port``: also a TLS listener (a CA and server certificate are generated; ``ca`` is the
    CA's path), or with ``certs`` ({"ca", "cert", "key"} paths) those. ``verify_peer``: the TLS
    listener requires a client certificate signed by that CA (mutual TLS); off by default.
    Ports default to free ones. ``restart()`` stops and starts the broker
    application inside the running node (seconds, not a new Erlang VM)."""

    def __init__(
        self,
        nodename: str,
        plain_port: int = 0,
        tls_port: int | None = None,
        dist_port: int = 0,
        certs: dict[str, str] | None = None,
        verify_peer: bool = False,
        cookie: str = "",
    ) -> None:
        assert not nodename.startswith("rabbit@"), "never touch the shared node"
        self.cookie = cookie or os.urandom(16).hex().upper()  # nodes of a cluster share one
        plain_port = plain_port or listen_port()
        dist_port = dist_port or listen_port()
        self.plain_port = plain_port
        self.tls_port = tls_port
        self.dist_port = dist_port
        self.nodename = nodename
        self.base = ""
        self.given_certs = dict(certs or {})
        self.certs: dict[str, str] = {}
        self.verify_peer = verify_peer
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ca(self) -> str:
        return self.certs["ca"]

    def _env(self) -> dict[str, str]:
        b = self.base
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k not in ("NODENAME", "HOME")
        }
        env.update(
            HOME=os.path.join(b, "home"),  # own Erlang cookie, generated on first start
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_CONF_ENV_FILE=os.path.join(b, "rabbitmq-env.conf"),  # not /etc/rabbitmq's
            RABBITMQ_CONFIG_FILE=os.path.join(b, "rabbitmq"),
            RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(b, "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(b, "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=os.path.join(b, "mnesia"),
            RABBITMQ_LOG_BASE=os.path.join(b, "log"),
            RABBITMQ_PID_FILE=os.path.join(b, "node.pid"),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_NODE_PORT=str(self.plain_port),
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """rabbitmqctl addressed explicitly to our node."""
        return subprocess.run(
            [os.path.join(RABBIT_BIN, "rabbitmqctl"), "-n", self.nodename, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, timeout: float = 60.0) -> BrokerNode:
        for p in (self.plain_port, self.tls_port, self.dist_port):
            if p is not None and not _port_free(p):
                raise RuntimeError(f"port {p} is busy: another private node still running?")
        self.base = tempfile.mkdtemp(prefix="amqproxy-node-")
        b = self.base
        for d in ("home", "mnesia", "log", "certs"):
            os.makedirs(os.path.join(b, d))
        cookie = os.path.join(b, "home", ".erlang.cookie")
        with open(cookie, "w") as f:
            f.write(self.cookie)
        os.chmod(cookie, 0o400)
        tls = ""
        if self.tls_port is not None:
            self.certs = dict(self.given_certs) or make_certs(os.path.join(b, "certs"))
            verify = ("verify_peer", "true") if self.verify_peer else ("verify_none", "false")
            tls = (
                f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}\n"
                f"ssl_options.cacertfile = {self.certs['ca']}\n"
                f"ssl_options.certfile = {self.certs['cert']}\n"
                f"ssl_options.keyfile = {self.certs['key']}\n"
                f"ssl_options.verify = {verify[0]}\n"
                f"ssl_options.fail_if_no_peer_cert = {verify[1]}\n"
            )
        with open(os.path.join(b, "rabbitmq-env.conf"), "w") as f:
            f.write("# private node: intentionally empty\n")
        with open(os.path.join(b, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        with open(os.path.join(b, "advanced.config"), "w") as f:
            f.write("[].\n")
        with open(os.path.join(b, "rabbitmq.conf"), "w") as f:
            f.write(
                f"listeners.tcp.1 = 127.0.0.1:{self.plain_port}\n" + tls + "log.console = false\n"
                "log.file.level = warning\n"
            )
        out = open(os.path.join(b, "log", "stdout.log"), "wb")
        self.proc = subprocess.Popen(
            [os.path.join(RABBIT_BIN, "rabbitmq-server")],
            env=self._env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole, by our pgid
        )
        out.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        import pika

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node {self.nodename} exited early:\n{self.log_tail()}")
            try:
                conn = pika.BlockingConnection(
                    pika.ConnectionParameters("127.0.0.1", self.plain_port, heartbeat=0)
                )
                conn.close()
                if self.tls_port is not None:
                    with socket.create_connection(("127.0.0.1", self.tls_port), timeout=2):
                        pass
                return
            except Exception as e:
                last = e
                time.sleep(0.5)
        raise TimeoutError(f"node {self.nodename} not ready after {timeout}s: {last!r}")

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the node's output and logs (read before ``stop`` removes them)."""
        out = []
        for path in sorted(glob.glob(os.path.join(self.base, "log", "*"))):
            with open(path, errors="replace") as f:
                out += [f"--- {os.path.basename(path)}", *f.read().splitlines()[-lines:]]
        return "\n".join(out) or "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        """Stop via rabbitmqctl -n <our node>; fall back to killing our own process group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.ctl("stop", timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # beam's helpers (erl_child_setup, inet_gethost) live in the same group: end them too
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            time.sleep(0.5)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self.proc = None
        if self.base:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = ""

    @property
    def url(self) -> str:
        return f"amqp://127.0.0.1:{self.plain_port}"

    def restart(self, down: float = 0.0, timeout: float = 60.0) -> None:
        """Stop the broker application, wait ``down`` seconds, start it again."""
        self.ctl("stop_app", timeout=timeout)
        time.sleep(down)
        self.ctl("start_app", timeout=timeout)
        self._wait_ready(timeout)

    def stop_app(self, timeout: float = 60.0) -> None:
        """Stop the broker application (the node's connections get 320, its port closes)."""
        done = self.ctl("stop_app", timeout=timeout)
        assert done.returncode == 0, done.stderr

    def start_app(self, timeout: float = 60.0) -> None:
        done = self.ctl("start_app", timeout=timeout)
        assert done.returncode == 0, done.stderr
        self._wait_ready(timeout)

    def join(self, other: BrokerNode, timeout: float = 60.0) -> None:
        """Join ``other``'s cluster (this node's own data is reset)."""
        for args in (("stop_app",), ("join_cluster", other.nodename), ("start_app",)):
            done = self.ctl(*args, timeout=timeout)
            assert done.returncode == 0, f"{args}: {done.stdout} {done.stderr}"
        self._wait_ready(timeout)

    def __enter__(self) -> BrokerNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _each(nodes: list[BrokerNode], work: str, *args: object) -> None:
    """``node.<work>(*args)`` on every node at once, in threads; the first error is raised
    once all are done."""
    errors: list[BaseException] = []

    def run(node: BrokerNode) -> None:
        try:
            getattr(node, work)(*args)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


class BrokerCluster:
    """``size`` private nodes (names ``PREFIX-1@localhost`` …, their own ports and data
    directories, one Erlang cookie), started in parallel and clustered: every other node
    joins the first (``rabbitmqctl -n B stop_app; join_cluster A; start_app``)."""

    def __init__(self, prefix: str, size: int = 3) -> None:
        cookie = os.urandom(16).hex().upper()
        self.nodes = [BrokerNode(f"{prefix}-{i + 1}@localhost", cookie=cookie) for i in range(size)]

    def start(self, timeout: float = 180.0) -> BrokerCluster:
        try:
            _each(self.nodes, "start", timeout)
            for node in self.nodes[1:]:
                node.join(self.nodes[0])
            done = self.nodes[0].ctl("cluster_status")
            running = done.stdout.split("Running Nodes", 1)[-1]
            missing = [n.nodename for n in self.nodes if n.nodename not in running]
            assert not missing, f"not clustered: {missing}\n{done.stdout}"
        except BaseException:
            self.stop()
            raise
        return self

    def add_users(self, users: dict[str, str], timeout: float = 30.0) -> None:
        """Users (name: password) with every right on "/", for the whole cluster, in one
        ``rabbitmqctl import_definitions`` (one Erlang VM start instead of two per user);
        returns once each can log in."""
        import pika

        from support.broker import _password_hash

        algorithm = "rabbit_password_hashing_sha256"
        definitions = {
            "users": [
                {"name": u, "password_hash": _password_hash(pw), "hashing_algorithm": algorithm,
                 "tags": []}
                for u, pw in users.items()
            ],
            "permissions": [
                {"user": u, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
                for u in users
            ],
        }  # fmt: skip
        path = os.path.join(self.nodes[0].base, "users.json")
        with open(path, "w") as f:
            json.dump(definitions, f)
        done = self.nodes[0].ctl("import_definitions", path)
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + timeout
        for user, password in users.items():
            while True:
                try:
                    credentials = pika.PlainCredentials(user, password)
                    params = pika.ConnectionParameters(
                        "127.0.0.1", self.nodes[0].plain_port, credentials=credentials
                    )
                    pika.BlockingConnection(params).close()
                    break
                except pika.exceptions.AMQPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def stop(self) -> None:
        """Stop every node (in parallel) and remove their directories."""
        _each(self.nodes, "stop")
