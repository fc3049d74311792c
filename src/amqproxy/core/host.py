"""What the I/O-free sessions ask of the side that owns sockets, loops and tasks.

``amqproxy.io`` implements these with asyncio; the core tests implement them with lists. A
session never blocks and never awaits: a round trip it needs (authenticate, open an upstream
channel) is started by its host, which reports the outcome back through the session's
methods named in each docstring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from amqproxy.amqp.auth import Credentials
from amqproxy.amqp.frames import Buffer

if TYPE_CHECKING:
    from amqproxy.channel import Connection, Lease
    from amqproxy.pool import Login, Pool
    from amqproxy.stats import PoolStats


def discard(pieces: list[Buffer]) -> None:
    """A session's ``send`` while its socket cannot take frames: a client connection not open
    (yet, or any more), an upstream connection not connected or closed (``_shutdown`` has told
    its clients' leases)."""


class BrokerFacts(Protocol):
    """What the client handshake mirrors of the broker (``broker.Broker``)."""

    def start_frame(self) -> bytes | None:
        """Connection.Start with the broker's properties; None until they are known."""

    def tune_frame(self, frame_max: int) -> bytes:
        """Connection.Tune offering ``frame_max`` (the broker's)."""


class ClientHost(Protocol):
    """The socket of one client, and the round trips its session cannot make itself."""

    peer: str  # "address:port", for logs

    def now(self) -> float:
        """The event loop's time."""

    def write(self, data: bytes) -> None:
        """Bytes to the client, now (its replies are answers it waits for)."""

    def deliver(self, pieces: list[Buffer]) -> None:
        """Frames from the broker, in one write; a client that does not read is dropped."""

    def close(self) -> None:
        """Close the socket once what was written is sent."""

    def abort(self) -> None:
        """Drop the socket now."""

    def close_after(self, seconds: float) -> None:
        """Drop the socket if it is still open after ``seconds`` (our Close went unanswered)."""

    def hold(self, reason: str) -> None:
        """Stop reading until every reason given is released."""

    def release(self, reason: str) -> None: ...

    def credit_traffic(self, stats: PoolStats) -> None:
        """Add the bytes read and written since the last call to ``stats``."""

    def start_heartbeat(self, seconds: int) -> None:
        """Heartbeats on this leg: calls ``heartbeat_missed()`` when the client falls silent."""

    def learn_broker(self) -> None:
        """The broker's properties are not known yet: find them, then ``send_start()``."""

    def check_credentials(self, credentials: Credentials, mechanism: str) -> None:
        """Have the broker check user and password (a login upstream that stops at its Tune):
        then ``credentials_checked(login)`` (login None: the broker cannot be reached now) or
        ``credentials_refused(code, text)``."""

    def authenticate(self, pool: Pool, login: Login | None) -> None:
        """Prove the pool's credentials and vhost (finishing ``login`` when there is one):
        then ``admitted(pool)`` or ``refused(pool, code, text)``."""

    def open_channel(
        self,
        pool: Pool,
        lease: Lease,
        confirm: bool,
        consume: bool = False,
        near: Connection | None = None,
    ) -> None:
        """A new upstream channel of ``pool`` for ``lease`` (waiting for the broker while an
        outage is held, or for a channel to be freed at ``--max-upstream-connections``):
        ``channel_ready(lease, up)``, ``channel_refused(lease, code, text)`` (no channel in
        time: a channel error) or ``channel_failed(lease, code, text)`` (a connection error).
        ``consume``: on a consume connection, ``near`` if it has room (``roles``), else where
        any channel goes."""

    def update_secret(self, pool: Pool, credentials: Credentials, reason: str) -> None:
        """Prove a new secret: ``secret_updated(...)`` or ``secret_refused(...)``."""


class UpstreamHost(Protocol):
    """The socket of one upstream connection."""

    def queue(self, pieces: list[Buffer]) -> None:
        """Frames for the broker, written with all that is queued in this turn of the event
        loop, in one write at its end (the list may be taken over)."""

    def write(self, data: bytes) -> None:
        """A frame for the broker now, after what is queued (order is kept)."""

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def start_heartbeat(self, seconds: int) -> None:
        """Heartbeats on this leg: calls ``heartbeat_missed()`` when the broker falls silent."""

    def abort_after(self, seconds: float) -> None:
        """Drop the socket if it is still open after ``seconds`` (our Close went unanswered)."""
