"""The supervisor of ``--workers N``: N proxy processes on the same ports, kept running.

Each worker is ``python -m amqproxy`` with the supervisor's own command line and three hidden
options (its number, the abstract unix socket its admin endpoint answers on, the supervisor's
pid): the same code, the same
configuration loading (a worker's SIGHUP reads the same file, environment and command line),
uvloop, and nothing to pickle — a restart is one more process like the first. Every worker
binds the listen ports with ``SO_REUSEPORT``; the kernel spreads new connections over those
that listen. The supervisor binds the ports first without it (a taken port fails at once with
the usual message) and then holds them, bound and not listening, so that no other program
takes them while a worker restarts.

Workers run in their own session (Ctrl-C reaches the supervisor alone, which forwards one
SIGTERM), and die with it (``PR_SET_PDEATHSIG``): a killed supervisor leaves no worker behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from amqproxy import logsetup
from amqproxy.aggregate import WorkerView
from amqproxy.config import ConfigError, Settings
from amqproxy.io.sockets import bound_socket
from amqproxy.server import ListenError
from amqproxy.supervisor_http import SupervisorHttp

log = logging.getLogger("amqproxy.supervisor")

STABLE_SECONDS = 10.0  # a worker that ran this long is restarted at once when it dies
MAX_BACKOFF = 30.0  # the longest wait before restarting a worker that keeps dying
CHECK_EVERY = 1.0  # the workers are also looked at this often (SIGCHLD aside)
KILL_WAIT = 5.0  # after SIGKILL, how long to wait for the processes to be gone


@dataclass
class Worker:
    """One worker slot: its process now, and how its previous ones ended."""

    index: int
    admin_path: str
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0  # monotonic
    restarts: int = 0
    quick_deaths: int = 0  # in a row, each within STABLE_SECONDS of its start
    last_exit: str = ""
    restart: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def view(self, now: float) -> WorkerView:
        alive = self.alive
        return WorkerView(
            self.index,
            self.proc.pid if alive and self.proc is not None else None,
            alive,
            self.restarts,
            now - self.started if alive else 0.0,
            self.last_exit,
        )


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def backoff(quick_deaths: int) -> float:
    """Seconds before a restart: none after a worker that ran a while, then 0.5, 1, 2 ... 30
    for one that keeps dying at once (a worker that cannot start must not spin)."""
    return 0.0 if quick_deaths == 0 else min(MAX_BACKOFF, 0.5 * 2 ** (quick_deaths - 1))


class Supervisor:
    """Starts the workers, restarts those that die, forwards signals, serves HTTP for all."""

    def __init__(
        self, settings: Settings, argv: Sequence[str], reload: Callable[[], Settings]
    ) -> None:
        self.settings = settings
        self.argv = list(argv)
        self._load = reload
        self.draining = False
        # Abstract unix sockets (Linux): no file for /tmp cleaners to remove from under a
        # long-running proxy, none left behind by a killed one. Anyone on the host who finds
        # the name may connect, as to the HTTP port: writes still need the admin token.
        base = f"\0amqproxy-{os.getpid()}-{secrets.token_hex(6)}" if settings.http_port else ""
        self.workers = [
            Worker(i, f"{base}-worker-{i}" if base else "") for i in range(1, settings.workers + 1)
        ]
        self._held: list[socket.socket] = []
        self._stop = asyncio.Event()
        self._gone = asyncio.Event()
        self._signals = 0
        self._watch_task: asyncio.Task[None] | None = None

    def views(self) -> list[WorkerView]:
        now = time.monotonic()
        return [worker.view(now) for worker in self.workers]

    # ---- running ----------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT; the exit status (0: every worker drained)."""
        try:
            http = await self._start()
            await self._stop.wait()
            status = await self._shutdown()
            if http is not None:
                http.stop()
            return status
        finally:
            for sock in self._held:
                sock.close()

    async def _start(self) -> SupervisorHttp | None:
        """HTTP first (as a single proxy does), then the AMQP and TLS ports checked and held,
        then the signals and the workers."""
        settings = self.settings
        http = None
        if settings.http_port:
            http = SupervisorHttp(self)
            await http.listen()
        self._held = hold_ports(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        for worker in self.workers:
            self._spawn(worker)
        self._watch_task = loop.create_task(self._watch(), name="worker watch")
        log.info(
            "supervisor: %d workers on %s port %d%s (pids %s)",
            len(self.workers),
            settings.listen_address,
            settings.listen_port,
            f" and TLS port {settings.tls_port}" if settings.tls_cert else "",
            ", ".join(str(w.proc.pid) for w in self.workers if w.proc is not None),
        )
        return http

    def _command(self, worker: Worker) -> list[str]:
        hidden = ["--worker-index", str(worker.index), "--worker-of", str(os.getpid())]
        if worker.admin_path:  # "@name" for the abstract "\0name": no NUL in an argument
            hidden += ["--worker-admin", "@" + worker.admin_path[1:]]
        return [sys.executable, "-m", "amqproxy", *self.argv, *hidden]

    def _spawn(self, worker: Worker) -> None:
        worker.restart = None
        if self.draining:
            return
        try:
            worker.proc = subprocess.Popen(
                self._command(worker), stdin=subprocess.DEVNULL, start_new_session=True
            )
        except OSError as exc:  # out of processes or memory: try again later
            log.error("worker %d: cannot start: %s", worker.index, exc)
            self._schedule(worker, MAX_BACKOFF)
            return
        worker.started = time.monotonic()

    def _schedule(self, worker: Worker, delay: float) -> None:
        loop = asyncio.get_running_loop()
        worker.restart = loop.call_later(delay, self._spawn, worker)

    def _reap(self) -> None:
        """SIGCHLD (and every CHECK_EVERY): a worker that died is restarted, after a pause
        when it keeps dying at once."""
        for worker in self.workers:
            proc = worker.proc
            if proc is None or proc.returncode is not None:
                continue
            returncode = proc.poll()
            if returncode is None:
                continue
            worker.last_exit = describe_exit(returncode)
            if self.draining:
                log.info("worker %d (pid %d): %s", worker.index, proc.pid, worker.last_exit)
                continue
            lived = time.monotonic() - worker.started
            worker.quick_deaths = worker.quick_deaths + 1 if lived < STABLE_SECONDS else 0
            delay = backoff(worker.quick_deaths)
            worker.restarts += 1
            log.warning(
                "worker %d (pid %d) died after %.1f s: %s; restarting it in %.1f s",
                worker.index,
                proc.pid,
                lived,
                worker.last_exit,
                delay,
            )
            self._schedule(worker, delay)
        if self.draining and not any(worker.alive for worker in self.workers):
            self._gone.set()

    async def _watch(self) -> None:
        while not self._gone.is_set():
            await asyncio.sleep(CHECK_EVERY)
            self._reap()

    # ---- signals ------------------------------------------------------------------------------

    def _on_signal(self, sig: signal.Signals) -> None:
        """SIGTERM or SIGINT: every worker drains (SIGTERM). A second one is forwarded too:
        the workers exit at once, as a single proxy does."""
        self._signals += 1
        if self._signals == 1:
            log.info("%s received: draining %d workers", sig.name, len(self.workers))
        else:
            log.warning("second %s: the workers exit at once", sig.name)
        self.draining = True
        for worker in self.workers:
            if worker.restart is not None:
                worker.restart.cancel()
                worker.restart = None
        self._send(signal.SIGTERM)
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: every worker reloads its configuration (and logs what changed); the
        supervisor takes what it uses itself: the admin token, the log level, the drain's
        timeouts."""
        try:
            new = self._load()
        except ConfigError as exc:
            log.error("reload failed, supervisor settings unchanged: %s", exc)
        else:
            for key in ("admin_token", "log_level", "term_timeout", "term_client_close_timeout"):
                setattr(self.settings, key, getattr(new, key))
            logsetup.set_level(new.log_level)
        log.info("SIGHUP received: reloading %d workers", sum(w.alive for w in self.workers))
        self._send(signal.SIGHUP)

    def _send(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker.alive and worker.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

    async def _shutdown(self) -> int:
        """Wait for the workers' drain (each bounded by its own timeouts), then SIGKILL
        what is left. 0 when every worker exited 0."""
        settings = self.settings
        # a worker's drain: the clients' grace, their CloseOk, the outbox, the upstreams
        bound = settings.term_client_close_timeout + 2 * settings.term_timeout + 10.0
        self._reap()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound):
                await self._gone.wait()
        left = [w for w in self.workers if w.alive and w.proc is not None]
        for worker in left:
            assert worker.proc is not None
            log.error("worker %d (pid %d) still runs: killing it", worker.index, worker.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
        for worker in left:
            assert worker.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(KILL_WAIT)
        codes = [w.proc.returncode for w in self.workers if w.proc is not None]
        codes = [code for code in codes if code is not None]
        # -SIGTERM: a worker stopped before its handlers were set, so before it served
        clean = (0, -signal.SIGTERM)
        status = 0 if not left and all(code in clean for code in codes) else 1
        log.info("supervisor stopped (workers: %s)", ", ".join(map(describe_exit, codes)))
        return status


# ---- the ports --------------------------------------------------------------------------------


def _bind_all(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Bind every address ``host`` resolves to, as the listeners will."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            bound.append(bound_socket(family, kind, proto, address, reuse_port))
    except OSError:
        for sock in bound:
            sock.close()
        raise
    return bound


def hold_ports(settings: Settings) -> list[socket.socket]:
    """Check that the AMQP (and TLS) port is free — bound without ``SO_REUSEPORT``, so that
    another proxy's workers count as taking it — then hold it with ``SO_REUSEPORT`` for the
    workers. ListenError, with the usual text, when a port is taken."""
    ports = [("AMQP", "-p/--port", settings.listen_port)]
    if settings.tls_cert:
        ports.append(("TLS", "--tls-port", settings.tls_port))
    held: list[socket.socket] = []
    try:
        for what, flag, port in ports:
            if port == 0:
                raise ListenError(f"{flag} 0 (any free port) cannot be shared by --workers")
            try:
                for sock in _bind_all(settings.listen_address, port, reuse_port=False):
                    sock.close()
                held += _bind_all(settings.listen_address, port, reuse_port=True)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise ListenError(
                    f"cannot listen for {what} on port {port} ({flag}): {reason}"
                ) from None
    except ListenError:
        for sock in held:
            sock.close()
        raise
    return held


# ---- in a worker ------------------------------------------------------------------------------


def bind_to_supervisor(supervisor_pid: int) -> bool:
    """In a worker: ask for SIGTERM when the supervisor dies (Linux), and say whether it
    still lives (it may have died before the request)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    return os.getppid() == supervisor_pid
