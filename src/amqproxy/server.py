"""The proxy process: listeners, the broker and the pools, housekeeping, signals, the drain."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from amqproxy import logsetup
from amqproxy.admin import AdminServer
from amqproxy.amqp import constants as c
from amqproxy.amqp import scan
from amqproxy.config import ConfigError, Settings, changes, shown, warnings
from amqproxy.io.admission import ClientLimit
from amqproxy.io.client import ClientProtocol
from amqproxy.io.tls_accept import TlsListener
from amqproxy.janitor import Janitor
from amqproxy.nodes import Nodes
from amqproxy.pool import PoolRegistry
from amqproxy.tls import Contexts
from amqproxy.tls import load as load_tls

log = logging.getLogger("amqproxy.server")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """What a worker process of a supervisor (``--workers``) is told: its number, and the
    unix socket its admin endpoint answers the supervisor on ("" for none)."""

    index: int
    admin_path: str


class Proxy:
    """Owns everything that lives as long as the process."""

    def __init__(
        self,
        settings: Settings,
        tls: Contexts | None = None,
        reload: Callable[[], Settings] | None = None,
        worker: WorkerRole | None = None,
    ) -> None:
        """``tls``: the TLS contexts built from the certificate files at start; ``reload``:
        the settings built again the way they were at start (the same config file,
        environment and command line), for SIGHUP; ``worker``: this process is one of a
        supervisor's workers (it shares the ports, and answers HTTP to the supervisor)."""
        self.settings = settings  # one object, shared: a reload changes it in place
        self.tls = tls or load_tls(settings)
        self._load = reload
        self.worker = worker
        self.accepted = 0  # client connections accepted since start
        self.client_limit = ClientLimit(settings)
        self.nodes = Nodes(settings, self.tls.upstream)  # the upstream list's brokers
        self.registry = PoolRegistry(settings, self.nodes.connect)
        self.clients: set[ClientProtocol] = set()
        self.janitor = Janitor(self.registry, self.clients)
        self.draining = False
        self._server: asyncio.Server | None = None
        self._tls_listener: TlsListener | None = None
        self._admin: AdminServer | None = None
        self._stop = asyncio.Event()
        self._signals = 0
        self._janitor: asyncio.Task[None] | None = None

    @property
    def listening(self) -> bool:
        """The AMQP listener accepts connections (``/readyz``)."""
        return self._server is not None and self._server.is_serving()

    def _client(self) -> ClientProtocol:
        self.accepted += 1
        refusal = self.client_limit.refusal(len(self.clients))
        return ClientProtocol(self.settings, self.registry, self.nodes, self.clients, refusal)

    @property
    def clients_refused(self) -> int:
        return self.client_limit.refused

    def _tls_context(self) -> ssl.SSLContext:
        assert self.tls.client is not None
        return self.tls.client

    # ---- running ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (HTTP first: a port that is taken stops the start before the proxy says it
        listens), then the signals, the janitor and a first look at the broker."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        worker = self.worker
        if worker is not None and worker.admin_path:
            self._admin = AdminServer(self, worker.admin_path)
            await self._admin.start()  # the supervisor made the directory: it cannot fail
        elif worker is None and settings.http_port:
            self._admin = AdminServer(self)
            await open_listener("HTTP", "-b/--http-port", settings.http_port, self._admin.start())
        self._server = await open_listener(
            "AMQP",
            "-p/--port",
            settings.listen_port,
            loop.create_server(
                self._client,
                settings.listen_address,
                settings.listen_port,
                reuse_address=True,
                reuse_port=worker is not None,  # the workers share the port: the kernel
                backlog=1024,  # spreads new connections over them
            ),
        )
        addresses = _addresses(self._server.sockets or [])
        if self.tls.client is not None:
            # asyncio needs a positive handshake timeout; 0 ("none") is its default of 60 s
            timeout = settings.handshake_timeout or 60.0
            self._tls_listener = TlsListener(
                self._client, self._tls_context, timeout, reuse_port=worker is not None
            )
            await self._tls_listener.start(settings.listen_address, settings.tls_port)
            addresses += f", TLS on {_addresses(self._tls_listener.sockets)}"
            if settings.tls_client_ca:
                addresses += " (client certificates required)"
        log.info(
            "amqproxy listening on %s, upstream %s, frame scanner: %s",
            addresses,
            shown("upstream", settings.upstream),
            "compiled" if scan.COMPILED else "pure Python",
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._janitor = loop.create_task(self.janitor.run(), name="janitor")
        await (
            self.nodes.check()
        )  # every node at once, bounded by the connect and handshake timeouts
        if settings.broker_check_interval > 0:
            self.nodes.watch(settings.broker_check_interval)

    async def run(self) -> None:
        await self.start()
        await self._stop.wait()
        await self._drain()

    def stop(self) -> None:
        """Drain and stop, as on SIGTERM (call it on the proxy's event loop)."""
        self._stop.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting at once", sig.name)
            logging.shutdown()
            os._exit(1)
        log.info("%s received: draining", sig.name)
        self._stop.set()

    # ---- SIGHUP ---------------------------------------------------------------------------------

    def reload(self) -> None:
        """Read the configuration again and apply what can change while clients stay
        connected; a configuration that does not load changes nothing (one ERROR line)."""
        if self._load is None:
            log.warning("SIGHUP: no configuration to reload")
            return
        try:
            new = self._load()
        except ConfigError as exc:
            log.error("reload failed, settings unchanged: %s", exc)
            return
        try:
            # Built from the files as they are now: a renewed certificate is read again.
            contexts = load_tls(new)
        except ConfigError as exc:  # a file missing, unreadable, or not what it should be
            log.error("reload failed, settings unchanged: %s", exc)
            return
        if (contexts.client is None) != (self.tls.client is None):
            log.warning("reload: turning the TLS listener on or off needs a restart; not applied")
            contexts = dataclasses.replace(contexts, client=self.tls.client)
        was_tls = self.settings.upstream_tls
        applied = self._apply(new)
        self.tls = contexts  # the TLS port reads it on every accept; the next clients get it
        self.nodes.reloaded(contexts.upstream)
        if "upstream" in applied:
            for warning in warnings(self.settings):
                log.warning("%s", warning)
            listed = self.nodes.sync()
            if was_tls != self.settings.upstream_tls:
                listed = set()  # amqp:// <-> amqps://: no connection is to a listed node
            for pool in list(self.registry.pools.values()):
                pool.retire_upstreams(lambda conn: conn.node not in listed)
        if "log_level" in applied:
            logsetup.set_level(self.settings.log_level)
        if "outbox_max_bytes" in applied:
            self.registry.outbox.max_bytes = self.settings.outbox_max_bytes
        if applied & {"max_upstream_connections", "max_upstream_channels", "pool_wait_timeout"}:
            for pool in list(self.registry.pools.values()):
                pool.room.wake_all()

    def _apply(self, new: Settings) -> set[str]:
        """Copy the changed settings into the shared object (every holder sees them at its
        next use); returns the keys applied. One line per change."""
        settings = self.settings
        applied = set()
        changed = changes(settings, new)
        if not changed:
            log.info("reload: no setting changed")
        for option, old_value, new_value in changed:
            key = option.key
            was, now = shown(key, old_value), shown(key, new_value)
            if not option.reloadable:
                log.warning("reload: %s %s -> %s needs a restart; not applied", key, was, now)
                continue
            setattr(settings, key, new_value)
            settings.sources[key] = new.sources.get(key, "default")
            applied.add(key)
            log.info("reload: %s %s -> %s", key, was, now)
        return applied

    async def _drain(self) -> None:
        """Stop accepting, give clients time to leave, close them, deliver what the outbox
        holds, close upstreams (each step within its timeout)."""
        settings = self.settings
        self.draining = True
        if self._server is not None:
            self._server.close()
        if self._tls_listener is not None:
            self._tls_listener.close()
        await _until(lambda: not self.clients, settings.term_client_close_timeout)
        if self.clients:
            log.info("closing %d remaining client(s)", len(self.clients))
            for client in list(self.clients):
                text = "CONNECTION_FORCED - amqproxy shutting down"
                client.session.close_with(c.CONNECTION_FORCED, text)
            await _until(lambda: not self.clients, settings.term_timeout)
            for client in list(self.clients):
                client.abort()
        outbox = self.registry.outbox
        if outbox.messages:
            log.info("delivering %d message(s) from the outbox", outbox.messages)
        await _until(lambda: not outbox.messages, settings.term_timeout)
        self.registry.stopped = True
        self.registry.close_all()
        await _until(lambda: not self.registry.upstream_count, min(settings.term_timeout, 5.0))
        undelivered = self.registry.undelivered()
        if undelivered:
            log.error(
                "%d message(s) the proxy answered for could not be delivered: %s",
                sum(undelivered.values()),
                ", ".join(f"{pool}: {count}" for pool, count in sorted(undelivered.items())),
                extra={"event": "outbox.undelivered", "reason": str(undelivered)},
            )
        self.nodes.stop()
        if self._admin is not None:
            await self._admin.stop()
        log.info("amqproxy stopped")


def _addresses(sockets: Iterable[socket.socket]) -> str:
    return ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in sockets)


async def _until(done: Callable[[], bool], seconds: float) -> None:
    """Wait until ``done()``, for ``seconds`` at most (the drain's steps)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            # The counts change in callbacks all over the proxy that signal nobody: poll them.
            while not done():  # noqa: ASYNC110
                await asyncio.sleep(0.05)


class ListenError(OSError):
    """A listening socket could not be opened; the text names the port's setting."""


async def open_listener(what: str, flag: str, port: int, opening: Awaitable[T]) -> T:
    try:
        return await opening
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ListenError(f"cannot listen for {what} on port {port} ({flag}): {reason}") from None
