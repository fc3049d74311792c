"""The client's connection handshake, I/O-free: the proxy answers as the broker would.

Protocol header, Start (with the broker's own properties), StartOk (the credentials, kept as
bytes), Tune (the broker's frame_max), TuneOk, Open. The credentials are proven upstream
before OpenOk: the session does that once ``Open`` has arrived (``ClientSession.opened``).
"""

from __future__ import annotations

import enum
import logging

from amqproxy.amqp import auth, frames, handshake
from amqproxy.amqp import constants as c
from amqproxy.amqp.frames import FrameError
from amqproxy.core.session import Session

log = logging.getLogger("amqproxy.client")


class Step(enum.Enum):
    HEADER = "header"  # waiting for the protocol header
    LEARNING = "learning"  # header read; the broker's properties are being learned
    START = "start"  # Connection.Start sent
    CHECKING = "checking"  # StartOk read; the broker is checking the credentials
    TUNE = "tune"  # Connection.Tune sent
    OPEN_WAIT = "open-wait"  # TuneOk received, waiting for Connection.Open
    DONE = "done"  # Connection.Open received (or the handshake ended)


class Handshake:
    """Where one client is in the handshake, and what it said."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.state = Step.HEADER
        self.wants_auth_close = False

    def receive(self, data: bytes) -> bytes:
        """Bytes during the handshake; returns what is kept for later (a partial frame, or
        what follows Connection.Open while the credentials are checked)."""
        if self.state is Step.HEADER:
            if len(data) < len(c.PROTOCOL_HEADER) and c.PROTOCOL_HEADER.startswith(data):
                return data
            if data[:8] != c.PROTOCOL_HEADER:
                self._wrong_header()
                return b""
            data = data[8:]
            start = self.session.broker.start_frame()
            if start is None:  # learned first; the session then calls start()
                self.state = Step.LEARNING
                self.session.host.learn_broker()
                return data
            self.start(start)
            if not data:
                return data
        if self.state is Step.LEARNING or self.state is Step.CHECKING:
            return data
        try:
            return self._frames(data)
        except FrameError as exc:
            self._failed(exc)
            return b""

    def start(self, start: bytes) -> None:
        """Connection.Start goes out."""
        self.state = Step.START
        self.session.host.write(start)

    def _wrong_header(self) -> None:
        """A wrong protocol header gets the one we speak, then the socket closes (4.2.2)."""
        session = self.session
        log.info("client %s sent a bad protocol header; answering with 0-9-1", session.host.peer)
        self.state = Step.DONE
        session.host.write(c.PROTOCOL_HEADER)
        session.hang_up()

    def _frames(self, data: bytes) -> bytes:
        session = self.session
        # What follows Connection.Open in the same read is ordinary traffic: scanned with the
        # broker's frame_max; the handshake's own frames are held to the client's limit.
        found, pos = frames.scan(data, max(session.frame_max, session.registry.frame_max))
        for ftype, channel_id, start, end in found:
            if ftype == c.FRAME_HEARTBEAT:
                continue
            if ftype != c.FRAME_METHOD or channel_id != 0:
                raise FrameError(
                    c.UNEXPECTED_FRAME, "UNEXPECTED_FRAME - non-method frame during handshake"
                )
            if end - start + c.FRAME_OVERHEAD > session.frame_max or end - start < 4:
                raise FrameError(
                    c.FRAME_ERROR, f"FRAME_ERROR - handshake frame of {end - start} bytes"
                )
            self._method(frames.method_id_at(data, start), data[start:end])
            if self.state is Step.DONE:  # the rest is for the open connection (or nobody)
                return data[end + 1 :]
        return data[pos:]

    def _failed(self, exc: FrameError) -> None:
        session = self.session
        before_tune = self.state is Step.START
        self.state = Step.DONE
        if before_tune:
            # Before Tune the client may not be ready for Connection.Close; just hang up.
            log.warning("client %s: %s", session.host.peer, exc.text)
            if exc.code != c.ACCESS_REFUSED:
                session.hang_up()
                return
        session.close_with(exc.code, exc.text)

    def _method(self, mid: int, payload: bytes) -> None:
        state = self.state
        if state is Step.START and mid == c.CONNECTION_START_OK:
            self._start_ok(payload)
        elif state is Step.TUNE and mid == c.CONNECTION_TUNE_OK:
            self._tune_ok(payload)
        elif state is Step.OPEN_WAIT and mid == c.CONNECTION_OPEN:
            self.state = Step.DONE
            self.session.opened(handshake.open_vhost(payload))
        elif mid == c.CONNECTION_CLOSE:
            self.state = Step.DONE
            self.session.host.write(frames.method_frame(0, frames.CONNECTION_CLOSE_OK))
            self.session.hang_up()
        else:
            raise FrameError(
                c.COMMAND_INVALID,
                f"COMMAND_INVALID - unexpected method {mid >> 16}.{mid & 0xFFFF} "
                f"in handshake state {state.value}",
            )

    def _start_ok(self, payload: bytes) -> None:
        session = self.session
        method = handshake.start_ok(payload)
        session.connection_name = method.connection_name
        session.wants_blocked = method.wants_blocked
        self.wants_auth_close = method.wants_auth_close
        session.credentials = auth.credentials(method.mechanism, method.response)
        session.user = auth.display(session.credentials.user)
        if session.refusal:  # over --max-clients: refused here, where every client shows it
            self.state = Step.DONE
            session.close_with(c.CONNECTION_FORCED, session.refusal, 10, 11, quiet=True)
            return
        session.trusted = session.registry.credentials_trusted(session.credentials)
        if session.trusted is not None:
            self.tune()  # proven recently: no round trip, no wait
        else:  # the broker checks the password now, as it would for a direct client
            self.state = Step.CHECKING
            session.host.check_credentials(session.credentials, method.mechanism)

    def tune(self) -> None:
        """Connection.Tune: the credentials are good (or the broker cannot tell now)."""
        session = self.session
        self.state = Step.TUNE
        session.host.write(session.broker.tune_frame(session.registry.frame_max))

    def refused(self, code: int, text: str) -> None:
        """The broker refused the credentials: as from RabbitMQ, Connection.Close before Tune
        to a client that announced authentication_failure_close, else the socket closes."""
        self.state = Step.DONE
        session = self.session
        if self.wants_auth_close:
            session.close_with(code, text)
        else:
            fields = session.log_fields("client.refused", code=code, reason=text)
            log.warning("client %s: %d %s", session.describe(), code, text, extra=fields)
            session.hang_up()

    def _tune_ok(self, payload: bytes) -> None:
        session = self.session
        channel_max, frame_max, heartbeat = handshake.tune_ok(payload)
        offered = session.registry.frame_max
        frame_max = frame_max or offered
        if frame_max < c.FRAME_MIN_SIZE or frame_max > offered:
            raise FrameError(
                c.NOT_ALLOWED,
                f"NOT_ALLOWED - frame_max {frame_max} outside {c.FRAME_MIN_SIZE}..{offered}",
            )
        session.frame_max = frame_max
        session.max_body = frame_max - c.FRAME_OVERHEAD
        limit = session.settings.channel_max
        session.channel_max = min(channel_max, limit) if channel_max else limit
        session.heartbeat = heartbeat
        session.host.start_heartbeat(heartbeat)
        self.state = Step.OPEN_WAIT
