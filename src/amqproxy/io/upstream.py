"""The asyncio side of an upstream connection: its socket, timers and write batching.

Everything the connection decides is ``core.upstream.UpstreamSession``'s; this adapter feeds it
the bytes, the time and the socket's events, and carries out what it asks (``core.host``).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import cast

from amqproxy.amqp.frames import Buffer
from amqproxy.core.upstream import UpstreamSession
from amqproxy.errors import UpstreamRefused, retrieve
from amqproxy.io.heartbeat import Heartbeat
from amqproxy.tls import describe


class UpstreamProtocol(asyncio.Protocol):
    """One TCP (or TLS) connection to the broker, driving one UpstreamSession."""

    def __init__(self, session: UpstreamSession) -> None:
        self.session = session
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[UpstreamSession] = self.loop.create_future()
        self.ready.add_done_callback(retrieve)  # a failed handshake nobody waits for any more
        self.tuned: asyncio.Future[None] = self.loop.create_future()  # credentials accepted
        self.tuned.add_done_callback(retrieve)
        self.bytes_out = 0  # written to the broker (the heartbeat compares counts)
        self.heartbeat = Heartbeat(
            self.loop, self._send_heartbeat, session.heartbeat_missed, self._traffic
        )
        self._queued: list[Buffer] = []  # frames for the broker, written at the end of the turn
        self._timer: asyncio.TimerHandle | None = None
        session.on_ready = self._on_ready
        self.data_received = session.receive  # type: ignore[method-assign]  # one call per read

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # TCP_NODELAY is already on: uvloop and asyncio set it on every TCP transport.
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        name = transport.get_extra_info("sockname")
        peer = f"{name[0]}:{name[1]}" if isinstance(name, tuple) else ""
        remote = transport.get_extra_info("peername")
        if isinstance(remote, tuple):
            self.session.remote = f"{remote[0]}:{remote[1]}"
        self.session.connected(self, peer)

    def data_received(self, data: bytes) -> None:
        self.session.receive(data)  # (replaced in __init__ by the session's own method)

    def connection_lost(self, exc: Exception | None) -> None:
        self.heartbeat.stop()
        if self._timer is not None:
            self._timer.cancel()
        if isinstance(exc, ssl.SSLError):  # e.g. the broker's alert: it wants a certificate
            exc = ConnectionError(f"TLS: {describe(exc)}")
        self.session.lost(exc)
        self._on_ready()

    def pause_writing(self) -> None:
        self.session.set_paused(True)

    def resume_writing(self) -> None:
        self.session.set_paused(False)

    # ---- core.host.UpstreamHost -------------------------------------------------------------

    def queue(self, pieces: list[Buffer]) -> None:
        queued = self._queued
        if queued:
            queued.extend(pieces)
        else:
            self._queued = pieces
            self.loop.call_soon(self._flush)

    def write(self, data: bytes) -> None:
        self._queued.append(data)
        self._flush()

    def _flush(self) -> None:
        pieces, self._queued = self._queued, []
        transport = self.transport
        if pieces and transport is not None and not transport.is_closing():
            data = b"".join(pieces)
            self.bytes_out += len(data)
            transport.write(data)

    def close(self) -> None:
        self._flush()  # what clients queued goes first
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _traffic(self) -> tuple[int, int]:
        return self.session.bytes_in, self.bytes_out

    def start_heartbeat(self, seconds: int) -> None:
        self.heartbeat.start(seconds)

    def abort_after(self, seconds: float) -> None:
        self._timer = self.loop.call_later(seconds, self.abort)

    # ---- the handshake ------------------------------------------------------------------------

    def _on_ready(self) -> None:
        """The session's handshake moved: the broker's Tune (credentials accepted), OpenOk,
        or its end without one."""
        session = self.session
        failure = session.ready_error or UpstreamRefused(320, "CONNECTION_FORCED - lost")
        ended = not session.handshaking or session.closed
        if not self.tuned.done():
            if session.tuned:
                self.tuned.set_result(None)
            elif ended:
                self.tuned.set_exception(failure)
        if self.ready.done() or not ended:
            return
        if session.open:
            self.ready.set_result(session)
        else:
            self.ready.set_exception(failure)

    def _send_heartbeat(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.bytes_out += len(frame)
            self.transport.write(frame)
