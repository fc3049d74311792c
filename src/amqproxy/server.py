"""The proxy process: listeners, the broker and the pools, housekeeping, signals, the drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable

from amqproxy.admin import AdminServer
from amqproxy.amqp import constants as c
from amqproxy.amqp import scan
from amqproxy.broker import Broker
from amqproxy.config import Settings
from amqproxy.io.client import ClientProtocol
from amqproxy.janitor import Janitor
from amqproxy.pool import PoolRegistry

log = logging.getLogger("amqproxy.server")


class Proxy:
    """Owns everything that lives as long as the process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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
        self._watch: asyncio.Task[None] | None = None

    @property
    def listening(self) -> bool:
        """The AMQP listener accepts connections (``/readyz``)."""
        return self._server is not None and self._server.is_serving()

    def _client(self) -> ClientProtocol:
        return ClientProtocol(self.settings, self.registry, self.broker, self.clients)

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
        self._janitor = loop.create_task(self.janitor.run(), name="janitor")
        await self.broker.check()  # bounded by the connect and handshake timeouts
        if settings.broker_check_interval > 0:
            registry = self.registry
            watch = self.broker.watch(
                settings.broker_check_interval,
                lambda: any(pool.live_upstream() for pool in registry.pools.values()),
            )
            self._watch = loop.create_task(watch, name="broker check")

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
        if self._watch is not None:
            self._watch.cancel()
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
