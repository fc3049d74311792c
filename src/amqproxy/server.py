"""The proxy process: listeners, the pools, housekeeping, signals and the graceful drain."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import signal
import socket
import ssl
import struct
from typing import Any

from pamqp import commands

from amqproxy import __version__
from amqproxy.admin import AdminServer
from amqproxy.amqp import auth, frames, scan
from amqproxy.amqp import constants as c
from amqproxy.client import ClientConnection
from amqproxy.config import Settings
from amqproxy.pool import PoolRegistry

log = logging.getLogger("amqproxy.server")

SWEEP_INTERVAL = 1.0
TRIM_AFTER_CLIENTS_LEFT = 200  # hand memory back once this many clients have gone


def _return_memory() -> None:
    """After a crowd of clients has left, give freed heap pages back to the OS (glibc)."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused, just not returned
        pass


class Proxy:
    """Owns everything that lives as long as the process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = PoolRegistry(settings)
        self.clients: set[ClientConnection] = set()
        self.draining = False
        self._server: asyncio.Server | None = None
        self._admin: AdminServer | None = None
        self._stop = asyncio.Event()
        self._probe: asyncio.Future[dict[str, Any]] | None = None
        self._signals = 0
        self._start_cache: tuple[dict[str, Any], bytes] | None = None
        self._tune_cache: tuple[tuple[int, int, int], bytes] | None = None

    # ---- clients ----------------------------------------------------------------------------

    def client_connected(self, client: ClientConnection) -> None:
        self.clients.add(client)

    def client_disconnected(self, client: ClientConnection) -> None:
        self.clients.discard(client)

    # ---- what the broker says about itself ---------------------------------------------------

    async def server_properties(self) -> dict[str, Any]:
        """The broker's Connection.Start properties, learned once and refreshed by upstreams."""
        if self.registry.server_properties is not None:
            return self.registry.server_properties
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_broker())
        try:
            return await asyncio.shield(self._probe)
        except Exception as exc:  # the broker is unreachable: the client learns it at Open
            log.warning("cannot read the broker's properties: %s", exc or type(exc).__name__)
            return {}

    def start_frame(self) -> bytes | None:
        """Connection.Start with the broker's properties, encoded once per change of them."""
        properties = self.registry.server_properties
        if properties is None:
            return None
        if self._start_cache is None or self._start_cache[0] is not properties:
            frame = frames.encode_method(
                0,
                commands.Connection.Start(
                    version_major=0,
                    version_minor=9,
                    server_properties=properties,
                    mechanisms=auth.MECHANISMS,
                    locales="en_US",
                ),
            )
            self._start_cache = (properties, frame)
        return self._start_cache[1]

    def fallback_start_frame(self) -> bytes:
        """Connection.Start when the broker could not be reached; Open will then fail (320)."""
        return frames.encode_method(
            0,
            commands.Connection.Start(
                server_properties={"product": "amqproxy", "version": __version__},
                mechanisms=auth.MECHANISMS,
                locales="en_US",
            ),
        )

    def tune_frame(self) -> bytes:
        """Connection.Tune offering the broker's frame_max (known once an upstream tuned)."""
        settings = self.settings
        key = (settings.channel_max, self.registry.frame_max, settings.heartbeat)
        if self._tune_cache is None or self._tune_cache[0] != key:
            self._tune_cache = (key, frames.encode_method(0, commands.Connection.Tune(*key)))
        return self._tune_cache[1]

    async def _probe_broker(self) -> dict[str, Any]:
        settings = self.settings
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                settings.upstream_host,
                settings.upstream_port,
                ssl=self.registry.ssl_context,
                server_hostname=settings.upstream_host if settings.upstream_tls else None,
            ),
            settings.connect_timeout,
        )
        try:
            writer.write(c.PROTOCOL_HEADER)
            head = await asyncio.wait_for(reader.readexactly(7), settings.handshake_timeout)
            ftype, _channel, size = struct.unpack(">BHI", head)
            if ftype != c.FRAME_METHOD or size > 1 << 20:
                raise ConnectionError("the broker did not send Connection.Start")
            payload = await asyncio.wait_for(
                reader.readexactly(size + 1), settings.handshake_timeout
            )
            method = frames.decode_method(payload[:-1])
            if not isinstance(method, commands.Connection.Start):
                raise ConnectionError(f"expected Connection.Start, got {method.name}")
            properties = dict(method.server_properties or {})
            self.registry.learn_server_properties(properties)
            return properties
        finally:
            writer.close()

    # ---- running ----------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self),
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
        loop.create_task(self._sweeper())
        try:
            await asyncio.wait_for(self.server_properties(), settings.connect_timeout + 1)
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

    async def _sweeper(self) -> None:
        loop = asyncio.get_running_loop()
        peak = 0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.registry.sweep(loop.time())
            count = len(self.clients)
            peak = max(peak, count)
            if peak - count >= TRIM_AFTER_CLIENTS_LEFT and count <= peak // 2:
                _return_memory()
                peak = count

    async def _drain(self) -> None:
        """Stop accepting, give clients time to leave, close them, close upstreams."""
        settings = self.settings
        self.draining = True
        if self._server is not None:
            self._server.close()
        await self._wait_clients_gone(settings.term_client_close_timeout)
        if self.clients:
            log.info("closing %d remaining client(s)", len(self.clients))
            for client in list(self.clients):
                client.close_with(c.CONNECTION_FORCED, "CONNECTION_FORCED - amqproxy shutting down")
            await self._wait_clients_gone(settings.term_timeout)
            for client in list(self.clients):
                if client.transport is not None:
                    client.transport.abort()
        await self._deliver_outbox(settings.term_timeout)
        self.registry.stopped = True
        self.registry.close_all()
        deadline = asyncio.get_running_loop().time() + min(settings.term_timeout, 5.0)
        while self.registry.upstream_count and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
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

    async def _deliver_outbox(self, timeout: float) -> None:
        """Keep trying to deliver what the outbox holds, for ``timeout`` seconds at most."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.registry.outbox.messages:
            log.info("delivering %d message(s) from the outbox", self.registry.outbox.messages)
        while self.registry.outbox.messages and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def _wait_clients_gone(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.clients and loop.time() < deadline:
            await asyncio.sleep(0.05)
