"""What the parts of a client session (handshake, channel table, hot path) see of it.

``core.client.ClientSession`` is the one implementation; the parts name it through this
protocol so that they do not import the module that assembles them.
"""

from __future__ import annotations

import enum
from typing import Protocol

from amqproxy.amqp.auth import Credentials
from amqproxy.channel import Client
from amqproxy.config import Settings
from amqproxy.core.host import BrokerFacts, ClientHost
from amqproxy.pool import Pool, PoolRegistry


class State(enum.Enum):
    """Where a client connection is (``ClientSession.state``)."""

    HANDSHAKE = "handshake"  # protocol header to Connection.Open (``Handshake`` knows where)
    AUTHENTICATING = "authenticating"  # proving the credentials upstream
    OPEN = "open"
    CLOSING = "closing"  # our Connection.Close sent, waiting for CloseOk
    CLOSED = "closed"


class Session(Client, Protocol):
    # What the handshake learns; the rest of the session reads it.
    user: str
    vhost: str
    credentials: Credentials
    connection_name: str
    channel_max: int
    heartbeat: int
    refusal: str  # over --max-clients: the text of the Connection.Close at StartOk
    trusted: Pool | None  # a pool of the credentials, trusted at StartOk
    state: State

    @property
    def host(self) -> ClientHost: ...

    @property
    def broker(self) -> BrokerFacts: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def registry(self) -> PoolRegistry: ...

    @property
    def pool(self) -> Pool | None: ...

    @property
    def is_open(self) -> bool: ...

    def describe(self) -> str: ...

    def log_fields(self, event: str, **more: object) -> dict[str, object]: ...

    def close_with(
        self, code: int, text: str, class_id: int = 0, method_id: int = 0, quiet: bool = False
    ) -> None: ...

    def hang_up(self) -> None: ...

    def opened(self, vhost: bytes) -> None: ...

    def on_connection_frame(self, ftype: int, data: bytes, start: int, end: int) -> None: ...

    def hold_for_outbox(self) -> None: ...
