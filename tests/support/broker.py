"""The shared broker from the tests' side: rabbitmqctl, throwaway tenants (a vhost, and a user
when asked), direct connections, queue helpers."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pika

from support.util import BROKER_HOST, BROKER_PORT, RABBITMQCTL, wait_for


# ---------------------------------------------------------------------------------------------
# broker side: rabbitmqctl, tenants, queues
# ---------------------------------------------------------------------------------------------
def rabbitmqctl(*args: str, timeout: float = 30.0, check: bool = True) -> str:
    res = subprocess.run([RABBITMQCTL, *args], capture_output=True, text=True, timeout=timeout)
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
    port: int = BROKER_PORT  # the shared broker, or a private node's (support.node)

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
            defs["users"] = [
                {
                    "name": self.user,
                    "password_hash": _password_hash(self.password),
                    "hashing_algorithm": "rabbit_password_hashing_sha256",
                    "tags": [],
                }
            ]
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


GUEST = Tenant("guest", "guest", "/")


@contextlib.contextmanager
def direct(
    tenant: Tenant = GUEST, attempts: int = 3
) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A channel on a direct connection to the broker (bypassing the proxy)."""
    conn = pika.BlockingConnection(
        pika.ConnectionParameters(
            BROKER_HOST,
            tenant.port,
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
                        except Exception:
                            ch = ch.connection.channel()
            except Exception:
                pass
