"""Fixtures for the amqproxy integration tests (real RabbitMQ on 127.0.0.1:5672, real clients).

* ``proxy_factory`` / ``module_proxy_factory``: start ``python -m amqproxy`` on free ports with
  extra arguments, wait until the AMQP port accepts connections and ``/healthz`` answers 200,
  stop it at teardown (SIGTERM, then SIGKILL).  The proxy's stderr goes to a file; for a failing
  test the logs of every proxy alive during the test are attached to the report.
* ``Proxy.metrics()``: the Prometheus endpoint parsed into something you can query by labels.
* ``tenant`` / ``tenant_factory``: a throwaway vhost (and optionally user) created with
  rabbitmqctl.  Every test that counts upstream connections or channels uses its own tenant, so
  one shared proxy per module is enough: pools (and their metric labels) never overlap.
* ``queues``: unique queue names, declared and deleted through a direct pika connection.
* ``fault_relay``: an asyncio TCP relay (own thread) between proxy and broker that can cut every
  connection at once, so upstream-failure tests never touch the shared broker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
SRC = Path(os.environ.get("AMQPROXY_TEST_SRC") or ROOT / "src")  # another version: A/B
BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672
BROKER_URL = f"amqp://{BROKER_HOST}:{BROKER_PORT}"
RABBITMQCTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"

# Configuration variables the proxy reads; scrubbed from the proxy's environment so the host's
# environment can never change what a test starts.
PROXY_ENV_VARS = (
    "AMQP_URL",
    "LISTEN_ADDRESS",
    "LISTEN_PORT",
    "HTTP_PORT",
    "LOG_LEVEL",
    "IDLE_CONNECTION_TIMEOUT",
    "MAX_UPSTREAM_CHANNELS",
    "TERM_TIMEOUT",
    "TERM_CLIENT_CLOSE_TIMEOUT",
)


# ---------------------------------------------------------------------------------------------
# small utilities
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition not met",
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; return that value or fail."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - reported below
            last_exc = exc
        if time.monotonic() >= deadline:
            msg = message() if callable(message) else message
            if last_exc is not None:
                msg += f" (last error: {last_exc!r})"
            raise AssertionError(f"timed out after {timeout}s: {msg}")
        time.sleep(interval)


def reply_code_of(exc: BaseException) -> int | None:
    """The AMQP reply code carried by a pika (or raw) connection error, however it is wrapped.

    pika turns a Connection.Close received before OpenOk into ProbableAccessDeniedError /
    ProbableAuthenticationError whose only argument is the repr of ConnectionClosedByBroker,
    e.g. ``"ConnectionClosedByBroker: (403) 'ACCESS_REFUSED - ...'"``.
    """
    seen: set[int] = set()

    def walk(e: Any) -> int | None:
        if id(e) in seen:
            return None
        seen.add(id(e))
        if isinstance(e, pika.exceptions.ConnectionClosed):
            return int(e.reply_code)
        code = getattr(e, "reply_code", None)
        if isinstance(code, int):
            return code
        if isinstance(e, str):
            m = re.search(r"\((\d{3})\)", e)
            return int(m.group(1)) if m else None
        if isinstance(e, BaseException):
            for a in e.args:
                r = walk(a)
                if r is not None:
                    return r
            for nested in (e.__cause__, e.__context__):
                if nested is not None:
                    r = walk(nested)
                    if r is not None:
                        return r
        return None

    return walk(exc)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
class Metrics:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples.append((s.name, dict(s.labels), float(s.value)))

    def get(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
        total = 0.0
        for sname, slabels, value in self.samples:
            if sname == name and all(slabels.get(k) == v for k, v in labels.items()):
                total += value
        return total

    def has(self, name: str) -> bool:
        return any(s[0] == name for s in self.samples)

    def as_dict(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {(n, frozenset(lbl.items())): v for n, lbl, v in self.samples}


# metric names from the contract
CLIENT_CONNECTIONS = "amqproxy_client_connections"
UPSTREAM_CONNECTIONS = "amqproxy_upstream_connections"
PARKED_CHANNELS = "amqproxy_parked_channels"
LEASED_CHANNELS = "amqproxy_leased_channels"
UPSTREAM_CONNECTS = "amqproxy_upstream_connects_total"
UPSTREAM_CHANNEL_OPENS = "amqproxy_upstream_channel_opens_total"
CHANNEL_REUSES = "amqproxy_channel_reuses_total"
OUTBOX_MESSAGES = "amqproxy_outbox_messages"


# ---------------------------------------------------------------------------------------------
# the proxy process
# ---------------------------------------------------------------------------------------------
class ProxyError(AssertionError):
    pass


_PROXIES: list[Proxy] = []


class Proxy:
    def __init__(
        self,
        args: list[str],
        upstream: str | None,
        log_path: Path,
        env: dict[str, str] | None = None,
        listen_args: bool = True,
    ) -> None:
        self.args = list(args)
        self.upstream = upstream
        self.log_path = log_path
        self.extra_env = dict(env or {})
        self.listen_args = listen_args
        self.host = "127.0.0.1"
        self.port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.stopped_at: float | None = None
        self._log_file: Any = None

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "amqproxy"]
        if self.listen_args:
            cmd += ["-l", self.host, "-p", str(self.port), "-b", str(self.http_port)]
        cmd += self.args
        if self.upstream is not None:
            cmd.append(self.upstream)
        return cmd

    def start(self, ready_timeout: float = 15.0, wait: bool = True, healthz: bool = True) -> Proxy:
        env = proxy_env(self.extra_env)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_file.write(f"$ {' '.join(self.command)}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            env=env,
            cwd=str(ROOT),
        )
        self.started_at = time.monotonic()
        _PROXIES.append(self)
        if wait:
            self.wait_ready(ready_timeout, healthz=healthz)
        return self

    def wait_ready(self, timeout: float = 15.0, healthz: bool = True) -> None:
        """Wait until the AMQP port accepts connections and (healthz=True) /healthz is 200."""
        deadline = time.monotonic() + timeout
        last = "never tried"
        while time.monotonic() < deadline:
            assert self.proc is not None
            rc = self.proc.poll()
            if rc is not None:
                raise ProxyError(
                    f"proxy exited with code {rc} before becoming ready\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                if not healthz:
                    return
                status, _ = self.http_get("/healthz", timeout=1.0)
                if status == 200:
                    return
                last = f"/healthz returned {status}"
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.05)
        raise ProxyError(f"proxy not ready after {timeout}s ({last})\n{self.log_tail()}")

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout=timeout)
        self._mark_stopped()
        return rc

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._mark_stopped()
        return self.proc.returncode

    def _mark_stopped(self) -> None:
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()
        if self._log_file is not None:
            with contextlib.suppress(Exception):
                self._log_file.close()
            self._log_file = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- observation ----------------------------------------------------------------------------
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 150) -> str:
        text = self.log().splitlines()
        head = f"----- proxy log {self.log_path} (last {min(lines, len(text))} lines) -----"
        return "\n".join([head, *text[-lines:]])

    def http_get(self, path: str, timeout: float = 3.0) -> tuple[int, str]:
        url = f"http://{self.host}:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def metrics(self) -> Metrics:
        status, text = self.http_get("/metrics")
        assert status == 200, f"/metrics returned {status}: {text[:500]}"
        return Metrics(text)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get(name, **labels)

    def wait_metric(
        self,
        name: str,
        expected: float | Callable[[float], bool],
        timeout: float = 5.0,
        **labels: str,
    ) -> float:
        check = expected if callable(expected) else (lambda v: v == expected)
        last: list[float] = []

        def probe() -> bool:
            v = self.metric(name, **labels)
            last[:] = [v]
            return bool(check(v))

        wait_for(
            probe,
            timeout,
            message=lambda: f"{name}{labels} expected {expected!r}, last value {last}",
        )
        return last[0]

    # -- clients ------------------------------------------------------------------------------
    def params(
        self,
        user: str = "guest",
        password: str = "guest",
        vhost: str = "/",
        **kw: Any,
    ) -> pika.ConnectionParameters:
        kw.setdefault("connection_attempts", 1)
        kw.setdefault("socket_timeout", 10)
        kw.setdefault("stack_timeout", 20)
        kw.setdefault("blocked_connection_timeout", None)
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=vhost,
            credentials=pika.PlainCredentials(user, password),
            **kw,
        )

    def connect(self, tenant: Tenant | None = None, **kw: Any) -> pika.BlockingConnection:
        if tenant is not None:
            kw.setdefault("user", tenant.user)
            kw.setdefault("password", tenant.password)
            kw.setdefault("vhost", tenant.vhost)
        return pika.BlockingConnection(self.params(**kw))

    def url(self, tenant: Tenant | None = None, user: str = "guest", password: str = "guest",
            vhost: str = "/") -> str:
        if tenant is not None:
            user, password, vhost = tenant.user, tenant.password, tenant.vhost
        q = urllib.parse.quote
        return f"amqp://{q(user, safe='')}:{q(password, safe='')}@{self.host}:{self.port}/" + q(
            vhost, safe=""
        )


def proxy_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_ENV_VARS}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_proxy_cli(
    args: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 15.0,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m amqproxy ARGS`` to completion (for --print-config and bad-config tests)."""
    return subprocess.run(
        [sys.executable, "-m", "amqproxy", *args],
        env=proxy_env(env),
        cwd=str(cwd or ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class _ProxyFactory:
    def __init__(self, tmp_dir: Path) -> None:
        self.tmp_dir = tmp_dir
        self.started: list[Proxy] = []

    def __call__(
        self,
        *args: str,
        upstream: str | None = BROKER_URL,
        env: dict[str, str] | None = None,
        ready_timeout: float = 15.0,
        wait: bool = True,
        healthz: bool = True,
    ) -> Proxy:
        log = self.tmp_dir / f"proxy-{len(self.started)}-{uuid.uuid4().hex[:6]}.log"
        proxy = Proxy(list(args), upstream, log, env=env)
        self.started.append(proxy)
        return proxy.start(ready_timeout=ready_timeout, wait=wait, healthz=healthz)

    def stop_all(self) -> None:
        """Stop every proxy; fail the teardown if one could not be stopped or if its log holds
        a bare traceback (the contract: failures are logged with a reason, never a traceback)."""
        errors = []
        for p in self.started:
            try:
                p.stop(timeout=10)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"could not stop {p.log_path}: {exc!r}")
            log = p.log()
            if "Traceback (most recent call last)" in log:
                at = log.index("Traceback (most recent call last)")
                errors.append(f"traceback in {p.log_path}:\n{log[max(0, at - 500) : at + 3000]}")
        if errors:
            raise ProxyError("\n".join(errors))


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[_ProxyFactory]:
    """Function-scoped: ``proxy_factory("-t", "1", upstream=...)`` -> running Proxy."""
    factory = _ProxyFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def module_proxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_ProxyFactory]:
    """Module-scoped variant for proxies shared by the tests of one module."""
    factory = _ProxyFactory(tmp_path_factory.mktemp("proxy"))
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def proxy(module_proxy_factory: _ProxyFactory) -> Proxy:
    """One default proxy per module, straight to the broker, idle timeout long enough that
    pools do not disappear under a test."""
    return module_proxy_factory("-t", "60")


# attach proxy logs to failing tests ----------------------------------------------------------
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # noqa: ARG001
    item._amqproxy_t0 = time.monotonic()  # type: ignore[attr-defined]
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    t0 = getattr(item, "_amqproxy_t0", 0.0)
    for p in _PROXIES:
        if p.started_at and (p.stopped_at is None or p.stopped_at >= t0):
            report.sections.append((f"amqproxy log ({report.when})", p.log_tail(200)))


# ---------------------------------------------------------------------------------------------
# broker side: rabbitmqctl, tenants, queues
# ---------------------------------------------------------------------------------------------
def rabbitmqctl(*args: str, timeout: float = 30.0, check: bool = True) -> str:
    res = subprocess.run(
        [RABBITMQCTL, *args], capture_output=True, text=True, timeout=timeout
    )
    if check and res.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {res.stderr or res.stdout}")
    return res.stdout


def _ctl_async(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [RABBITMQCTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def list_connections(*fields: str) -> list[dict[str, str]]:
    """rabbitmqctl list_connections as dicts (tab separated, no headers)."""
    out = rabbitmqctl("list_connections", "-q", "--no-table-headers", *fields)
    rows = []
    for line in out.splitlines():
        if not line.strip():
            continue
        parts = line.split("\t")
        rows.append(dict(zip(fields, parts, strict=False)))
    return rows


def list_consumers(vhost: str) -> list[str]:
    out = rabbitmqctl("list_consumers", "-q", "--no-table-headers", "-p", vhost, "queue_name")
    return [ln.strip() for ln in out.splitlines() if ln.strip()]


@dataclass(frozen=True)
class Tenant:
    user: str
    password: str
    vhost: str

    @property
    def labels(self) -> dict[str, str]:
        return {"user": self.user, "vhost": self.vhost}


_PENDING_DELETES: list[subprocess.Popen[str]] = []


def _password_hash(password: str) -> str:
    """rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


class _TenantPool:
    """Throwaway vhosts for one shared session user, created in batches with a single
    ``rabbitmqctl import_definitions`` call (one Erlang VM start per batch instead of three per
    tenant); each vhost is deleted after the test that used it."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.user = f"itest-u-{tag}"
        self.password = f"pw-{uuid.uuid4().hex[:12]}"
        self.user_created = False
        self.available: list[str] = []
        self.batch = 4
        self.lock = threading.Lock()

    def take(self) -> Tenant:
        with self.lock:
            if not self.available:
                self._create_batch(self.batch)
                self.batch = min(self.batch * 2, 16)
            return Tenant(self.user, self.password, self.available.pop(0))

    def _create_batch(self, n: int) -> None:
        vhosts = [f"itest-vh-{uuid.uuid4().hex[:8]}" for _ in range(n)]
        defs: dict[str, Any] = {
            "vhosts": [{"name": v} for v in vhosts],
            "permissions": [
                {"user": self.user, "vhost": v, "configure": ".*", "write": ".*", "read": ".*"}
                for v in vhosts
            ],
        }
        if not self.user_created:
            defs["users"] = [{
                "name": self.user,
                "password_hash": _password_hash(self.password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }]
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(defs, f)
        os.chmod(f.name, 0o644)  # read by the broker node, not by rabbitmqctl
        try:
            rabbitmqctl("import_definitions", f.name)
        finally:
            os.unlink(f.name)
        self.user_created = True
        # the import is asynchronous: wait until every new vhost accepts our user
        pending = list(vhosts)

        def usable() -> bool:
            while pending:
                with direct(Tenant(self.user, self.password, pending[0]), attempts=1):
                    pending.pop(0)
            return True

        wait_for(usable, 15, interval=0.2, message=lambda: f"imported vhosts {pending} not usable")
        self.available.extend(vhosts)

    def finish(self) -> list[subprocess.Popen[str]]:
        procs = [_ctl_async("delete_vhost", v) for v in self.available]
        self.available.clear()
        if self.user_created:
            procs.append(_ctl_async("delete_user", self.user))
        return procs


_TENANTS = _TenantPool()


@pytest.fixture
def tenant_factory() -> Iterator[Callable[..., Tenant]]:
    """Throwaway tenants, deleted (in the background) after the test.

    ``tenant_factory()``: a fresh vhost for the session user (own pool, own metric labels).
    ``tenant_factory(own_user=True)``: a fresh vhost and a new user with rights only there.
    ``tenant_factory(vhost=v)``: a new user with rights on the existing vhost ``v``.
    """
    created_users: list[str] = []
    created_vhosts: list[str] = []

    def make(vhost: str | None = None, own_user: bool = False) -> Tenant:
        if vhost is None:
            base = _TENANTS.take()
            created_vhosts.append(base.vhost)
            if not own_user:
                return base
            vhost = base.vhost
        user = f"itest-own-{uuid.uuid4().hex[:8]}"
        password = f"pw-{uuid.uuid4().hex[:12]}"
        rabbitmqctl("add_user", user, password)
        created_users.append(user)
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        return Tenant(user, password, vhost)

    yield make
    for u in created_users:
        _PENDING_DELETES.append(_ctl_async("delete_user", u))
    for v in created_vhosts:
        _PENDING_DELETES.append(_ctl_async("delete_vhost", v))
    # keep at most a few deletions in flight so they do not starve the tests of CPU
    while sum(p.poll() is None for p in _PENDING_DELETES) > 2:
        time.sleep(0.05)


@pytest.fixture
def tenant(tenant_factory: Callable[..., Tenant]) -> Tenant:
    return tenant_factory()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:  # noqa: ARG001
    for p in _PROXIES:
        if p.alive:
            with contextlib.suppress(Exception):
                p.stop(timeout=5)
    for p in _PENDING_DELETES:
        with contextlib.suppress(Exception):
            p.communicate(timeout=60)
    for p in _TENANTS.finish():
        with contextlib.suppress(Exception):
            p.communicate(timeout=60)


GUEST = Tenant("guest", "guest", "/")


@contextlib.contextmanager
def direct(
    tenant: Tenant = GUEST, attempts: int = 3
) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A channel on a direct connection to the broker (bypassing the proxy)."""
    conn = pika.BlockingConnection(
        pika.ConnectionParameters(
            BROKER_HOST,
            BROKER_PORT,
            tenant.vhost,
            pika.PlainCredentials(tenant.user, tenant.password),
            connection_attempts=attempts,
            retry_delay=0.5,
            client_properties={"connection_name": "itest-direct"},
        )
    )
    try:
        yield conn.channel()
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def queue_counts(tenant: Tenant, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of a queue, via a passive declare on a direct connection."""
    with direct(tenant) as ch:
        ok = ch.queue_declare(queue, passive=True).method
        return int(ok.message_count), int(ok.consumer_count)


def drain(tenant: Tenant, queue: str, limit: int = 100000) -> list[tuple[bytes, Any, Any]]:
    """Take every ready message off a queue (direct connection, no_ack Basic.Get), in order.

    Returns (body, method, properties) tuples."""
    out = []
    with direct(tenant) as ch:
        while len(out) < limit:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                break
            out.append((body, method, props))
    return out


class QueueHelper:
    def __init__(self) -> None:
        self.created: list[tuple[Tenant, str]] = []

    def name(self, prefix: str = "itest-q") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:10]}"

    def declare(self, tenant: Tenant = GUEST, name: str | None = None, **kw: Any) -> str:
        name = name or self.name()
        with direct(tenant) as ch:
            ch.queue_declare(name, **kw)
        self.created.append((tenant, name))
        return name

    def cleanup(self) -> None:
        by_tenant: dict[Tenant, list[str]] = {}
        for t, q in self.created:
            by_tenant.setdefault(t, []).append(q)
        for t, names in by_tenant.items():
            try:
                with direct(t) as ch:
                    for q in names:
                        try:
                            ch.queue_delete(q)
                        except Exception:  # noqa: BLE001 - channel closed, reopen
                            ch = ch.connection.channel()
            except Exception:  # noqa: BLE001,S110 - vhost/user already deleted
                pass


@pytest.fixture
def queues() -> Iterator[QueueHelper]:
    helper = QueueHelper()
    yield helper
    helper.cleanup()


# ---------------------------------------------------------------------------------------------
# fault relay
# ---------------------------------------------------------------------------------------------
class _RelaySide(asyncio.Protocol):
    def __init__(self, relay: FaultRelay, pair: _RelayPair, name: str) -> None:
        self.relay = relay
        self.pair = pair
        self.name = name
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.name == "down":
            self.pair.on_downstream(self)

    def data_received(self, data: bytes) -> None:
        self.pair.forward(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pair.frozen and self.name == "up":
            return  # a frozen network: the proxy side must notice the silence by itself
        self.pair.close()


class _RelayPair:
    def __init__(self, relay: FaultRelay) -> None:
        self.relay = relay
        self.down: _RelaySide | None = None
        self.up: _RelaySide | None = None
        self.pending: list[bytes] = []
        self.held: list[bytes] = []  # broker -> proxy data held back by hold_replies()
        self.frozen = False
        self.closed = False

    def on_downstream(self, side: _RelaySide) -> None:
        self.down = side
        self.relay._pairs[self] = None
        self.relay.accepted_total += 1
        mode = self.relay.mode
        if mode == "refuse":
            self.close()
            return
        if mode == "blackhole":
            return
        asyncio.get_running_loop().create_task(self._connect_up())

    async def _connect_up(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(
                lambda: _RelaySide(self.relay, self, "up"), *self.relay.target
            )
        except OSError:
            self.close()
            return
        if self.closed:
            up.transport and up.transport.abort()  # type: ignore[func-returns-value]
            return
        self.up = up  # type: ignore[assignment]
        for chunk in self.pending:
            up.transport.write(chunk)  # type: ignore[union-attr]
        self.pending.clear()

    def forward(self, src: _RelaySide, data: bytes) -> None:
        if self.relay.mode == "freeze":
            self.frozen = True  # a dead path stays dead: TCP never resumes after lost bytes
        if self.closed or self.frozen:
            return
        if src is self.down:
            if self.relay.mode == "blackhole":
                return
            if self.up is None or self.up.transport is None:
                self.pending.append(data)
            else:
                self.up.transport.write(data)
        elif self.relay.replies_held:
            self.held.append(data)
        elif self.down is not None and self.down.transport is not None:
            self.down.transport.write(data)

    def release(self) -> None:
        held, self.held = self.held, []
        if self.down is not None and self.down.transport is not None and not self.closed:
            for chunk in held:
                self.down.transport.write(chunk)

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.relay._pairs.pop(self, None)
        for side in (self.down, self.up):
            if side is not None and side.transport is not None:
                if abort:
                    side.transport.abort()
                else:
                    side.transport.close()


class FaultRelay:
    """TCP relay 127.0.0.1:<port> -> target, in its own thread.

    mode: "forward" (default), "blackhole" (accept, never answer; drops client->broker data of
    open connections too), "refuse" (accept and close), "freeze" (open connections go silent in
    both directions for good and the broker's closing is not passed on: a dead network path;
    connections made after the mode changes back work).
    ``cut()`` closes every relayed connection at once (both legs). ``hold_replies()`` keeps
    what the broker sends from reaching the proxy until ``release_replies()`` (in order): the
    way to make a race between a broker reply and a client's next step happen on purpose.
    """

    def __init__(self, target: tuple[str, int] = (BROKER_HOST, BROKER_PORT)) -> None:
        self.target = target
        self._mode = "forward"
        self.replies_held = False
        self.accepted_total = 0
        self._pairs: dict[_RelayPair, None] = {}  # insertion (accept) order
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="fault-relay", daemon=True
        )
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    def start(self) -> FaultRelay:
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
        fut.result(timeout=5)
        return self

    async def _serve(self) -> None:
        def factory() -> _RelaySide:
            return _RelaySide(self, _RelayPair(self), "down")

        self.server = await self.loop.create_server(factory, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"amqp://127.0.0.1:{self.port}"

    def _call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=5)

    @property
    def connections(self) -> int:
        return int(self._call(lambda: len(self._pairs)))

    def cut(self, abort: bool = True, only: int | None = None) -> int:
        """Close every relayed connection now (abort=True: TCP RST), or only the ``only``-th
        of the currently open ones in accept order. Returns how many were closed."""

        def do() -> int:
            pairs = list(self._pairs)
            if only is not None:
                pairs = pairs[only : only + 1]
            for p in pairs:
                p.close(abort=abort)
            return len(pairs)

        return int(self._call(do))

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self._mode = mode
        if mode == "freeze" and self.thread.is_alive():

            def freeze_all() -> None:
                for p in self._pairs:
                    p.frozen = True

            self._call(freeze_all)

    def hold_replies(self) -> None:
        self._call(lambda: setattr(self, "replies_held", True))

    def release_replies(self) -> None:
        def do() -> None:
            self.replies_held = False
            for p in list(self._pairs):
                p.release()

        self._call(do)

    def close(self) -> None:
        def do() -> None:
            for p in list(self._pairs):
                p.close(abort=True)
            if self.server is not None:
                self.server.close()

        with contextlib.suppress(Exception):
            self._call(do)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@pytest.fixture
def fault_relay() -> Iterator[FaultRelay]:
    relay = FaultRelay().start()
    yield relay
    relay.close()
