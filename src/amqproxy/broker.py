"""What the proxy knows of the broker, and how it reaches it.

Its address and TLS context, its ``Connection.Start`` properties (the proxy mirrors them to its
own clients rather than making them up), its frame_max, and the one helper that opens an
upstream connection: TCP/TLS connect and AMQP handshake, each within its timeout.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from typing import Any

from pamqp import commands

from amqproxy import __version__
from amqproxy.amqp import auth, frames
from amqproxy.amqp import constants as c
from amqproxy.amqp.auth import Credentials
from amqproxy.config import Settings
from amqproxy.core.upstream import UpstreamSession
from amqproxy.errors import UpstreamRefused
from amqproxy.io.upstream import UpstreamProtocol
from amqproxy.pool import Pool
from amqproxy.tls import describe

log = logging.getLogger("amqproxy.broker")


class Broker:
    """The upstream broker, as far as the proxy knows it."""

    def __init__(self, settings: Settings, ssl_context: ssl.SSLContext | None) -> None:
        self.settings = settings
        self.ssl_context = ssl_context  # tls.upstream_context: verifies the URL's host name
        self.server_properties: dict[str, Any] | None = None  # learned from Connection.Start
        self._serial = 0
        self._probe: asyncio.Future[dict[str, Any]] | None = None
        self._probe_failing = False  # the last probe failed (logged already)
        self._start_cache: tuple[dict[str, Any], bytes] | None = None
        self._tune_cache: tuple[tuple[int, int, int], bytes] | None = None

    def reloaded(self, ssl_context: ssl.SSLContext | None) -> None:
        """SIGHUP: new upstream connections use the TLS context built from the files as they
        are now, and the address the shared settings hold now. The properties mirrored to
        clients are those of the next broker an upstream connection reaches (no extra probe)."""
        self.ssl_context = ssl_context

    # ---- reaching it --------------------------------------------------------------------------

    async def connect(self, pool: Pool) -> UpstreamSession:
        """A new upstream connection for ``pool``, its handshake done.

        UpstreamRefused: the broker could not be reached (``reachable`` False), did not finish
        the handshake in time, or refused the credentials or vhost (the broker's code)."""
        self._serial += 1
        session = UpstreamSession(pool, self._serial, self.settings, self._now())
        protocol = await self._open(session)
        await self._handshake(protocol, protocol.ready)
        return self._connected(session)

    async def login(self, credentials: Credentials, mechanism: str = "PLAIN") -> Login:
        """An upstream connection whose broker accepted ``credentials`` (its Tune arrived),
        waiting for the vhost: ``Login.finish(pool)`` completes it, ``abandon()`` drops it.
        UpstreamRefused as for ``connect``; a wrong password is the broker's 403."""
        self._serial += 1
        now = self._now()
        session = UpstreamSession(None, self._serial, self.settings, now, credentials, mechanism)
        protocol = await self._open(session)
        await self._handshake(protocol, protocol.tuned)
        return Login(self, session, protocol)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def _open(self, session: UpstreamSession) -> UpstreamProtocol:
        """TCP (and TLS) to the broker, within --connect-timeout."""
        settings = self.settings
        protocol = UpstreamProtocol(session)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(
                    lambda: protocol,
                    settings.upstream_host,
                    settings.upstream_port,
                    ssl=self.ssl_context,
                    server_hostname=settings.upstream_host if settings.upstream_tls else None,
                ),
                settings.connect_timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            text = f"CONNECTION_FORCED - {_unreachable(exc)}"
            raise UpstreamRefused(c.CONNECTION_FORCED, text, reachable=False) from None
        return protocol

    async def _handshake(self, protocol: UpstreamProtocol, step: asyncio.Future[Any]) -> None:
        """Wait for a step of the AMQP handshake, within --handshake-timeout."""
        try:
            await asyncio.wait_for(asyncio.shield(step), self.settings.handshake_timeout)
        except TimeoutError:
            protocol.abort()
            raise UpstreamRefused(
                c.CONNECTION_FORCED, "CONNECTION_FORCED - broker handshake timed out"
            ) from None

    def _connected(self, session: UpstreamSession) -> UpstreamSession:
        if session.server_properties:
            self.server_properties = session.server_properties
        return session

    # ---- what it says about itself ----------------------------------------------------------

    async def properties(self) -> dict[str, Any]:
        """The broker's Connection.Start properties, learned once and refreshed by upstreams;
        {} when it cannot be reached (clients learn that at Connection.Open)."""
        if self.server_properties is not None:
            return self.server_properties
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._read_start())
        try:
            return await asyncio.shield(self._probe)
        except Exception as exc:  # unreachable, not AMQP, too slow: the client learns at Open
            # Once per failing streak, not once per client that waited for it.
            level = logging.DEBUG if self._probe_failing else logging.WARNING
            self._probe_failing = True
            log.log(level, "cannot read the broker's properties: %s", describe(exc))
            return {}

    async def _read_start(self) -> dict[str, Any]:
        settings = self.settings
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                settings.upstream_host,
                settings.upstream_port,
                ssl=self.ssl_context,
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
            self.server_properties = properties
            self._probe_failing = False
            return properties
        finally:
            writer.close()

    def start_frame(self) -> bytes | None:
        """Connection.Start with the broker's properties, encoded once per change of them."""
        properties = self.server_properties
        if properties is None:
            return None
        if self._start_cache is None or self._start_cache[0] is not properties:
            start = commands.Connection.Start(
                version_major=0,
                version_minor=9,
                server_properties=properties,
                mechanisms=auth.MECHANISMS,
                locales="en_US",
            )
            self._start_cache = (properties, frames.encode_method(0, start))
        return self._start_cache[1]

    def fallback_start_frame(self) -> bytes:
        """Connection.Start when the broker could not be reached; Open will then fail (320)."""
        start = commands.Connection.Start(
            server_properties={"product": "amqproxy", "version": __version__},
            mechanisms=auth.MECHANISMS,
            locales="en_US",
        )
        return frames.encode_method(0, start)

    def tune_frame(self, frame_max: int) -> bytes:
        """Connection.Tune offering the broker's frame_max (known once an upstream tuned)."""
        settings = self.settings
        key = (settings.channel_max, frame_max, settings.heartbeat)
        if self._tune_cache is None or self._tune_cache[0] != key:
            self._tune_cache = (key, frames.encode_method(0, commands.Connection.Tune(*key)))
        return self._tune_cache[1]


def _unreachable(exc: BaseException) -> str:
    """Why the broker could not be reached, in words; a certificate it was refused for (not
    signed by --upstream-ca, not for the URL's host) or a TLS alert it sent says so."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"broker certificate not accepted: {exc.verify_message or describe(exc)}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS with the broker failed: {describe(exc)}"
    return f"broker unreachable: {describe(exc)}"


class Login:
    """The broker accepted a client's credentials on this upstream connection; the client's
    vhost, once its Connection.Open arrives, finishes it into a connection of that pool."""

    def __init__(self, broker: Broker, session: UpstreamSession, protocol: UpstreamProtocol):
        self.broker = broker
        self.session = session
        self.protocol = protocol

    async def finish(self, pool: Pool) -> UpstreamSession:
        self.session.open_vhost(pool)
        await self.broker._handshake(self.protocol, self.protocol.ready)
        return self.broker._connected(self.session)

    def abandon(self) -> None:
        self.session.abandon()
