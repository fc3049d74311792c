"""What the proxy knows of one broker node, and how it reaches it.

Its address and TLS context, its ``Connection.Start`` properties (the proxy mirrors them to its
own clients rather than making them up), whether it answers AMQP now (checked at start and
every few seconds: ``/readyz``), the upstream connections open to it, and the one helper that
opens an upstream connection: TCP/TLS connect and AMQP handshake, each within its timeout.
``nodes.Nodes`` holds one per URL of the upstream list and places connections among them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import ssl
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pamqp import commands

from amqproxy.amqp import constants as c
from amqproxy.amqp import frames, handshake
from amqproxy.amqp.auth import Credentials
from amqproxy.config import Settings
from amqproxy.core.upstream import UpstreamSession
from amqproxy.errors import UpstreamRefused, retrieve
from amqproxy.io.upstream import UpstreamProtocol
from amqproxy.pool import Pool
from amqproxy.tls import describe

log = logging.getLogger("amqproxy.broker")

REACHABLE, UNREACHABLE, NOT_AMQP, UNKNOWN = "reachable", "unreachable", "not-amqp", "unknown"
# The 320s RabbitMQ sends about one vhost or user (deleted, its vhost process down on this
# node): the node itself is fine. Every other 320 (shutdown, maintenance, an operator's
# close) takes the node out of placement until a probe or a connection finds it answering.
NOT_THE_NODE = re.compile(r"(CONNECTION_FORCED - )?(vhost|user) '")


class NotAMQP(ConnectionError):
    """Something answers at the broker's address, but not AMQP 0-9-1."""


@dataclass
class Health:
    """What the last look at the broker found: a check of its own (``Broker.check``), or an
    upstream connection attempt (``Broker.connect``) or loss. ``label`` names it in the log:
    "broker" for the only node, "broker node HOST:PORT" for one of several."""

    state: str = UNKNOWN
    detail: str = "not checked yet"
    checked_at: float | None = None  # loop time of the last look
    since: float | None = None  # loop time the state last changed
    label: str = "broker"
    listener: Callable[[], None] | None = None  # told of every look (``Nodes``' summary)

    def record(self, state: str, detail: str) -> None:
        now = asyncio.get_running_loop().time()
        if state != self.state:
            if state == REACHABLE:
                if self.state != UNKNOWN:
                    log.info("%s answers AMQP again (%s)", self.label, detail)
            elif state == UNREACHABLE:
                log.warning("%s unreachable: %s", self.label, detail)
            elif self.label == "broker":
                log.warning("%s", detail)
            else:
                log.warning("%s: %s", self.label, detail)
            self.since = now
        self.state, self.detail, self.checked_at = state, detail, now
        if self.listener is not None:
            self.listener()


class Broker:
    """One broker node, as far as the proxy knows it."""

    def __init__(
        self,
        settings: Settings,
        ssl_context: ssl.SSLContext | None,
        host: str = "",
        port: int = 0,
        serials: Iterator[int] | None = None,
    ) -> None:
        """``host``, ``port``: the node (default: the first of the upstream list);
        ``serials``: connection numbers shared with the other nodes (names stay unique)."""
        self.settings = settings
        self.ssl_context = ssl_context  # tls.upstream_context: verifies the URL's host name
        self.host = host or settings.upstream_host
        self.port = port or settings.upstream_port
        self.name = f"{self.host}:{self.port}"
        self.server_properties: dict[str, Any] | None = None  # learned from Connection.Start
        self.learned: Callable[[dict[str, Any]], None] | None = None  # told of new properties
        self._serials = serials or itertools.count(1)
        self._probe: asyncio.Future[dict[str, Any]] | None = None
        self.health = Health()
        # Upstream connections to this node, handshaking ones included (placement counts them).
        self.sessions: set[UpstreamSession] = set()

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
        clock = asyncio.get_running_loop().time
        session = self._session(UpstreamSession(pool, next(self._serials), self.settings, clock))
        try:
            protocol = await self._open(session)
            await self._handshake(protocol, protocol.ready)
        finally:
            if not session.open:
                self.sessions.discard(session)
        return self._connected(session)

    async def login(self, credentials: Credentials, mechanism: str = "PLAIN") -> Login:
        """An upstream connection whose broker accepted ``credentials`` (its Tune arrived),
        waiting for the vhost: ``Login.finish(pool)`` completes it, ``abandon()`` drops it.
        UpstreamRefused as for ``connect``; a wrong password is the broker's 403."""
        serial, clock = next(self._serials), asyncio.get_running_loop().time
        session = UpstreamSession(None, serial, self.settings, clock, credentials, mechanism)
        self._session(session)
        try:
            protocol = await self._open(session)
            await self._handshake(protocol, protocol.tuned)
        finally:
            if session.closed or not session.tuned:
                self.sessions.discard(session)
        self.health.record(REACHABLE, "the broker checked a client's password")
        return Login(self, session, protocol)

    def _session(self, session: UpstreamSession) -> UpstreamSession:
        """Count ``session`` as this node's until it ends; its loss (or the broker closing
        it with 320: shutting down, drained) marks the node down at once."""
        session.node = self.name
        self.sessions.add(session)

        def closed(code: int, text: str, lost: bool) -> None:
            self.sessions.discard(session)
            if lost and code == c.CONNECTION_FORCED and not NOT_THE_NODE.match(text):
                self.health.record(UNREACHABLE, text.removeprefix("CONNECTION_FORCED - "))

        session.on_closed = closed
        return session

    @property
    def open_connections(self) -> int:
        """Upstream connections to this node past their handshake."""
        return sum(1 for session in self.sessions if session.open)

    async def _open(self, session: UpstreamSession) -> UpstreamProtocol:
        """TCP (and TLS) to the broker, within --connect-timeout."""
        settings = self.settings
        protocol = UpstreamProtocol(session)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(
                    lambda: protocol,
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.host if settings.upstream_tls else None,
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
            self._learn(session.server_properties)
        return session

    def _learn(self, properties: dict[str, Any]) -> None:
        self.server_properties = properties
        if self.learned is not None:
            self.learned(properties)

    # ---- whether it answers ------------------------------------------------------------------

    async def check(self) -> None:
        """Does the broker answer AMQP 0-9-1 now? A fresh socket, the protocol header, its
        Connection.Start, closed (each step within its timeout); the answer goes to
        ``health``. A probe under way (a client's first contact) is that look."""
        try:
            await asyncio.shield(self._probing())
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

    async def watch(self, interval: float) -> None:
        """Look at the node every ``interval`` seconds. While an upstream connection to it is
        open, its heartbeats prove the node answers: no check then (each one costs the
        broker a connection and a log line)."""
        while True:
            await asyncio.sleep(interval)
            if self.open_connections:
                self.health.record(REACHABLE, "upstream connections open")
            else:
                await self.check()

    # ---- what it says about itself ----------------------------------------------------------

    async def properties(self) -> dict[str, Any]:
        """The broker's Connection.Start properties, learned once and refreshed by upstreams;
        {} when it cannot be reached (clients learn that at Connection.Open)."""
        if self.server_properties is not None:
            return self.server_properties
        try:
            return await asyncio.shield(self._probing())
        except Exception as exc:  # unreachable, not AMQP, too slow: the client learns at Open
            # Health.record says it once per outage, when an attempt finds the broker gone.
            log.debug("cannot read the broker's properties: %s", describe(exc))
            return {}

    def _probing(self) -> asyncio.Future[dict[str, Any]]:
        """The look at the broker under way, or a new one: a check and the first clients'
        wait for the properties share one socket (at start-up they come together)."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._read_start())
            self._probe.add_done_callback(retrieve)
        return self._probe

    async def _read_start(self) -> dict[str, Any]:
        settings = self.settings
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.host if settings.upstream_tls else None,
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
            self._learn(properties)
            return properties
        finally:
            writer.close()


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
