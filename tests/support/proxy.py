"""The proxy under test as a process: ``python -m amqproxy`` on free ports, its log, its metrics
and health, and a factory that stops every proxy it started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika

from support.broker import Tenant
from support.util import BROKER_URL, PROXY_ENV_VARS, ROOT, SRC, Metrics, free_port, wait_for


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
        self._log_file = open(self.log_path, "ab")
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
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def get_json(self, path: str, timeout: float = 3.0) -> Any:
        """The JSON body of a GET on the HTTP port (whatever the status)."""
        return json.loads(self.http_get(path, timeout)[1])

    def worker_pids(self) -> dict[int, int | None]:
        """With --workers: each worker's pid by number (None while it is down), from
        /healthz."""
        rows = self.get_json("/healthz")["workers"]["list"]
        return {row["worker"]: row["pid"] for row in rows}

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

    def url(
        self,
        tenant: Tenant | None = None,
        user: str = "guest",
        password: str = "guest",
        vhost: str = "/",
    ) -> str:
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
            except Exception as exc:
                errors.append(f"could not stop {p.log_path}: {exc!r}")
            log = p.log()
            if "Traceback (most recent call last)" in log:
                at = log.index("Traceback (most recent call last)")
                errors.append(f"traceback in {p.log_path}:\n{log[max(0, at - 500) : at + 3000]}")
        if errors:
            raise ProxyError("\n".join(errors))


def tls_params(port: int, tenant: Tenant, context: ssl.SSLContext) -> pika.ConnectionParameters:
    """pika's parameters for ``tenant`` on a TLS port of the proxy, trusting ``context``."""
    return pika.ConnectionParameters(
        "127.0.0.1",
        port,
        tenant.vhost,
        pika.PlainCredentials(tenant.user, tenant.password),
        ssl_options=pika.SSLOptions(context, "localhost"),
        connection_attempts=1,
        socket_timeout=10,
        stack_timeout=20,
    )
