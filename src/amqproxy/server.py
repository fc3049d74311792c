"""The proxy process: listeners, the broker and the pools, housekeeping, signals, the drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable

from amqproxy import logsetup
from amqproxy.admin import AdminServer
from amqproxy.amqp import constants as c
from amqproxy.amqp import scan
from amqproxy.broker import Broker
from amqproxy.config import ConfigError, Settings, changes, shown, warn_ignored_url_parts
from amqproxy.io.admission import ClientLimit
from amqproxy.io.client import ClientProtocol
from amqproxy.janitor import Janitor
from amqproxy.pool import PoolRegistry

log = logging.getLogger("amqproxy.server")


class Proxy:
    """Owns everything that lives as long as the process."""

    def __init__(self, settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
        """``reload``: the settings built again the way they were at start (the same config
        file, environment and command line), for SIGHUP."""
        self.settings = settings  # one object, shared: a reload changes it in place
        self._load = reload
        self.client_limit = ClientLimit(settings)
        self.broker = Broker(settings)
        self.registry = PoolRegistry(settings, self.broker.connect)
        self.clients: set[ClientProtocol] = set()
        self.janitor = Janitor(self.registry, self.clients)
        self.draining = False
        self._server: asyncio.Server | None = None
        self._admin: AdminServer | None = None
        self._stop = asyncio.Event()
        self._signals = 0
        self._janitor: asyncio.Task[None] | None = None

    def _client(self) -> ClientProtocol:
        refusal = self.client_limit.refusal(len(self.clients))
        return ClientProtocol(self.settings, self.registry, self.broker, self.clients, refusal)

    @property
    def clients_refused(self) -> int:
        return self.client_limit.refused

    # ---- running ----------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._client,
            settings.listen_address,
            settings.listen_port,
            reuse_address=True,
            backlog=1024,
        )
        sockets: list[socket.socket] = list(self._server.sockets or [])
        addresses = ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in sockets)
        log.info(
            "amqproxy listening on %s, upstream %s%s, frame scanner: %s",
            addresses,
            "amqps://" if settings.upstream_tls else "amqp://",
            settings.upstream_address,
            "compiled" if scan.COMPILED else "pure Python",
        )
        if settings.http_port:
            self._admin = AdminServer(self)
            await self._admin.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._janitor = loop.create_task(self.janitor.run(), name="janitor")
        try:
            await asyncio.wait_for(self.broker.properties(), settings.connect_timeout + 1)
        except (TimeoutError, OSError, ssl.SSLError):
            pass

    async def run(self) -> None:
        await self.start()
        await self._stop.wait()
        await self._drain()

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
            upstream_ssl = new.upstream_ssl_context()
        except (OSError, ssl.SSLError) as exc:  # the CA bundle is missing or not one
            why = getattr(exc, "strerror", None) or exc
            log.error(
                "reload failed, settings unchanged: upstream_ca: cannot load %r: %s",
                new.upstream_ca,
                why,
            )
            return
        applied = self._apply(new)
        self.broker.reloaded(upstream_ssl)
        if "upstream" in applied:
            warn_ignored_url_parts(self.settings)
            for pool in list(self.registry.pools.values()):
                pool.retire_upstreams()
        if "log_level" in applied:
            logsetup.set_level(self.settings.log_level)
        if "outbox_max_bytes" in applied:
            self.registry.outbox.max_bytes = self.settings.outbox_max_bytes
        if applied & {"max_upstream_connections", "max_upstream_channels", "pool_wait_timeout"}:
            for pool in list(self.registry.pools.values()):
                pool.room.wake_all()
        # Client-side TLS (--tls-cert/--tls-key): the listener's SSL context is to be loaded
        # again here, so that a renewed certificate serves the next clients.

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
            )
        if self._admin is not None:
            await self._admin.stop()
        log.info("amqproxy stopped")


async def _until(done: Callable[[], bool], seconds: float) -> None:
    """Wait until ``done()``, for ``seconds`` at most (the drain's steps)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            # The counts change in callbacks all over the proxy that signal nobody: poll them.
            while not done():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
