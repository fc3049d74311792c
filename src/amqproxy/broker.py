"""What the proxy knows of the broker, and how it reaches it.

Its address and TLS context, its ``Connection.Start`` properties (the proxy mirrors them to its
own clients rather than making them up), its frame_max, whether it answers AMQP now (checked at
start and every few seconds: ``/readyz``), and the one helper that opens an upstream
connection: TCP/TLS connect and AMQP handshake, each within its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pamqp import commands

from amqproxy import __version__
from amqproxy.amqp import auth, frames, handshake
from amqproxy.amqp import constants as c
from amqproxy.amqp.auth import Credentials
from amqproxy.config import Settings
from amqproxy.core.upstream import UpstreamSession
from amqproxy.errors import UpstreamRefused
from amqproxy.io.upstream import UpstreamProtocol
from amqproxy.pool import Pool
from amqproxy.tls import describe

log = logging.getLogger("amqproxy.broker")

REACHABLE, UNREACHABLE, NOT_AMQP, UNKNOWN = "reachable", "unreachable", "not-amqp", "unknown"


class NotAMQP(ConnectionError):
    """Something answers at the broker's address, but not AMQP 0-9-1."""


@dataclass
class Health:
    """What the last look at the broker found: a check of its own (``Broker.check``), or an
    upstream connection attempt (``Broker.connect``)."""

    state: str = UNKNOWN
    detail: str = "not checked yet"
    checked_at: float | None = None  # loop time of the last look
    since: float | None = None  # loop time the state last changed

    def record(self, state: str, detail: str) -> None:
        now = asyncio.get_running_loop().time()
        if state != self.state:
            if state == REACHABLE:
                if self.state != UNKNOWN:
                    log.info("broker answers AMQP again (%s)", detail)
            elif state == UNREACHABLE:
                log.warning("broker unreachable: %s", detail)
            else:
                log.warning("%s", detail)
            self.since = now
        self.state, self.detail, self.checked_at = state, detail, now


class Broker:
    """The upstream broker, as far as the proxy knows it."""

    def __init__(self, settings: Settings, ssl_context: ssl.SSLContext | None) -> None:
        self.settings = settings
        self.ssl_context = ssl_context  # tls.upstream_context: verifies the URL's host name
        self.server_properties: dict[str, Any] | None = None  # learned from Connection.Start
        self._serial = 0
        self._probe: asyncio.Future[dict[str, Any]] | None = None
        self._start_cache: tuple[dict[str, Any], bytes] | None = None
        self._tune_cache: tuple[tuple[int, int, int], bytes] | None = None
        self.health = Health()

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
        self.health.record(REACHABLE, "the broker checked a client's password")
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
            reason = _unreachable(exc)
            self.health.record(UNREACHABLE, reason.removeprefix("broker unreachable: "))
            text = f"CONNECTION_FORCED - {reason}"
            raise UpstreamRefused(c.CONNECTION_FORCED, text, reachable=False) from None
        return protocol

    async def _handshake(self, protocol: UpstreamProtocol, step: asyncio.Future[Any]) -> None:
        """Wait for a step of the AMQP handshake, within --handshake-timeout."""
        try:
            await asyncio.wait_for(asyncio.shield(step), self.settings.handshake_timeout)
        except TimeoutError:
            protocol.abort()
            self.health.record(UNREACHABLE, "the AMQP handshake timed out")
            raise UpstreamRefused(
                c.CONNECTION_FORCED, "CONNECTION_FORCED - broker handshake timed out"
            ) from None
        except UpstreamRefused as exc:
            if protocol.session.not_amqp is not None:
                self.health.record(NOT_AMQP, protocol.session.not_amqp)
            elif exc.code == c.CONNECTION_FORCED:  # dropped in the handshake (a TLS alert...)
                self.health.record(UNREACHABLE, exc.text.removeprefix("CONNECTION_FORCED - "))
            raise

    def _connected(self, session: UpstreamSession) -> UpstreamSession:
        self.health.record(REACHABLE, "an upstream connection opened")
        if session.server_properties:
            self.server_properties = session.server_properties
        return session

    # ---- whether it answers ------------------------------------------------------------------

    async def check(self) -> None:
        """Does the broker answer AMQP 0-9-1 now? A fresh socket, the protocol header, its
        Connection.Start, closed (each step within its timeout); the answer goes to
        ``health``."""
        try:
            await self._read_start()
        except NotAMQP as exc:
            self.health.record(NOT_AMQP, str(exc))
        except (OSError, EOFError, TimeoutError, ssl.SSLError) as exc:
            self.health.record(UNREACHABLE, describe(exc))
        except frames.FrameError as exc:
            self.health.record(NOT_AMQP, f"{handshake.NOT_AMQP} ({exc.text})")
        except Exception as exc:  # an answer nobody foresaw: reported, and checked again later
            self.health.record(UNREACHABLE, f"the check failed: {exc!r}")
        else:
            self.health.record(REACHABLE, "answered the protocol header with Connection.Start")

    async def watch(self, interval: float, connected: Callable[[], bool]) -> None:
        """Look at the broker every ``interval`` seconds. While an upstream connection is
        open, its heartbeats prove the broker answers: no check then (each one costs the
        broker a connection and a log line)."""
        while True:
            await asyncio.sleep(interval)
            if connected():
                self.health.record(REACHABLE, "upstream connections open")
            else:
                await self.check()

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
            # Health.record says it once per outage, when an attempt finds the broker gone.
            log.debug("cannot read the broker's properties: %s", describe(exc))
            return {}

    async def _read_start(self) -> dict[str, Any]:
        settings = self.settings
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    settings.upstream_host,
                    settings.upstream_port,
                    ssl=self.ssl_context,
                    server_hostname=settings.upstream_host if settings.upstream_tls else None,
                ),
                settings.connect_timeout,
            )
        except TimeoutError:
            raise TimeoutError(f"connect timed out after {settings.connect_timeout:g}s") from None
        try:
            writer.write(c.PROTOCOL_HEADER)
            head = await _read(reader, 7, settings.handshake_timeout)
            if handshake.not_amqp(head) is not None:  # a little more of it, for the operator
                with contextlib.suppress(OSError, TimeoutError):
                    head += await asyncio.wait_for(reader.read(17), 0.5)
                raise NotAMQP(handshake.not_amqp(head))
            size = struct.unpack_from(">I", head, 3)[0]
            payload = await _read(reader, size + 1, settings.handshake_timeout, head)
            method = frames.decode_method(payload[:-1])
            if not isinstance(method, commands.Connection.Start):
                raise NotAMQP(f"{handshake.NOT_AMQP} (its first frame is {method.name})")
            properties = dict(method.server_properties or {})
            self.server_properties = properties
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


async def _read(
    reader: asyncio.StreamReader, size: int, seconds: float, head: bytes = b""
) -> bytes:
    """``size`` bytes of the broker's first frame (``head``: what came before them)."""
    try:
        return await asyncio.wait_for(reader.readexactly(size), seconds)
    except TimeoutError:
        raise TimeoutError(f"no Connection.Start within {seconds:g}s") from None
    except asyncio.IncompleteReadError as exc:
        wrong = handshake.not_amqp(head + exc.partial)
        if wrong is not None:
            raise NotAMQP(wrong) from None
        raise ConnectionError("the broker closed the connection before Connection.Start") from None
