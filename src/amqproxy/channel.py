"""Upstream channels and the leases that bind them to client channels: their states, and the
transitions between them (docs/ARCHITECTURE.md, "The lease lifecycle").

An UpstreamChannel outlives its leases: it remembers what the broker counts per channel
(confirm sequence numbers, delivery tags) so that the next lease can translate tags, what makes
it unfit for reuse, and the publishes it carried that the broker has not confirmed yet (its
outbox). A Lease is one client channel. Their states change only through their own methods
here; parking, settling and closing are the pool's (``Pool.release`` and friends). No I/O
here: the connection and the client are named by what this module needs of them.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import TYPE_CHECKING, Protocol

from amqproxy.core.publish import Assembly, Stage
from amqproxy.outbox import ChannelOutbox, Totals

if TYPE_CHECKING:
    from amqproxy.amqp.frames import Buffer


class Connection(Protocol):
    """An upstream connection as channels and pools see it (``core.upstream.UpstreamSession``)."""

    name: str
    peer: str
    remote: str  # the broker's address, "host:port"
    node: str  # the node of the upstream list it went to, "host:port"
    started: float  # loop time the connection was made
    last_read: float  # loop time of the broker's last bytes (heartbeats included)
    open: bool
    closed: bool
    frame_max: int
    channel_max: int
    heartbeat: int
    leased: int
    last_used: float
    blocked_reason: str | None
    channels: dict[int, UpstreamChannel]
    exclusive_owners: dict[bytes, Client]  # exclusive queues declared here -> their client
    paused: bool  # its write buffer is full: clients stop reading until it drains
    role: str  # "publish" or "consume" (``roles``)

    @property
    def free_channels(self) -> int: ...

    def now(self) -> float: ...

    def on_lease_change(self, delta: int) -> None: ...

    def open_channel(self, preferred: int = 0, confirm: bool = True) -> UpstreamChannel: ...

    def close_channel(self, up: UpstreamChannel, text: str) -> None: ...

    def send(self, pieces: list[Buffer]) -> None: ...

    def wait_for_room(self, client: Client) -> None: ...

    def close(self, text: str = ...) -> None: ...

    def delete_queue(self, name: bytes, why: str) -> None: ...


class Client(Protocol):
    """A client as its leases, the pool and the upstream connections see it
    (``core.client.ClientSession``)."""

    identity: str  # user@vhost from address (connection name), for logs
    frame_max: int
    max_body: int
    wants_blocked: bool

    @property
    def leases(self) -> dict[int, Lease]: ...

    def send(self, pieces: list[Buffer]) -> None:
        """Frames from the broker for this client."""

    def close_with(self, code: int, text: str) -> None: ...

    def credit_traffic(self) -> None:
        """Bring the pool's byte totals up to date with this client's."""

    def channel_closed_by_broker(self, lease: Lease, close_payload: bytes) -> None: ...

    def channel_closed_upstream(self, lease: Lease) -> None: ...

    def own_exclusive_queue(self, name: bytes, conn: Connection) -> None:
        """``name`` is an exclusive queue the client declared on ``conn``."""

    def upstream_lost(self, leases: list[Lease], code: int, text: str, hold: bool) -> None: ...

    def resume_reading(self) -> None:
        """The upstream this client writes to has room again."""


class Releaser(Protocol):
    """Who takes a lease's upstream channel back (``pool.Pool``): the pool it came from."""

    def release(self, lease: Lease, why: str) -> None: ...


class ChannelState(enum.Enum):
    OPENING = "opening"  # Channel.Open sent upstream (leases use it at once), OpenOk not yet seen
    OPEN = "open"  # leased, parked or settling
    CLOSING = "closing"  # Channel.Close sent upstream, CloseOk not yet seen


class UpstreamChannel:
    """One channel on an upstream connection."""

    __slots__ = (
        "confirm_mode",
        "confirmed",
        "confirmed_ahead",
        "conn",
        "delivered",
        "dirty",
        "id",
        "last_client",
        "lease",
        "outbox",
        "published",
        "requests",
        "settling_since",
        "state",
    )

    def __init__(self, conn: Connection, channel_id: int, totals: Totals) -> None:
        self.conn = conn
        self.id = channel_id
        self.state = ChannelState.OPENING
        self.lease: Lease | None = None
        self.confirm_mode = False
        self.published = 0  # publishes since Confirm.Select: the broker's last confirm tag
        self.confirmed = 0  # every tag up to this one is confirmed
        self.confirmed_ahead: set[int] = set()  # confirmed tags above ``confirmed``
        self.delivered = 0  # Deliver/GetOk seen: the broker's last delivery tag
        self.requests: deque[int] = deque()  # unanswered sync requests: ``published`` then
        self.dirty: str | None = None  # why this channel must not be reused, if it must not
        self.last_client = ""  # who used it last, for logs about errors that arrive later
        self.settling_since = 0.0
        self.outbox = ChannelOutbox(totals)  # publishes the proxy answered for, unconfirmed

    def confirm(self, tag: int, multiple: bool) -> None:
        """Record a broker Ack/Nack for publishes in confirm mode."""
        if not self.confirmed_ahead and (multiple or tag == self.confirmed + 1):
            if tag > self.confirmed:  # the usual case: in order
                self.confirmed = tag
        elif multiple:
            if tag > self.confirmed:
                self.confirmed = tag
                self.confirmed_ahead = {t for t in self.confirmed_ahead if t > tag}
        elif tag == self.confirmed + 1:
            self.confirmed = tag
        elif tag > self.confirmed:
            self.confirmed_ahead.add(tag)
        while self.confirmed_ahead and (self.confirmed + 1) in self.confirmed_ahead:
            self.confirmed += 1
            self.confirmed_ahead.discard(self.confirmed)
        if self.outbox:
            self.outbox.confirmed_through(self.confirmed)

    def opened(self) -> None:
        """The broker's Channel.OpenOk."""
        if self.state is ChannelState.OPENING:
            self.state = ChannelState.OPEN

    def close_sent(self) -> None:
        """The proxy's own Channel.Close goes upstream: its CloseOk frees the id."""
        self.state = ChannelState.CLOSING
        self.lease = None

    def request_sent(self) -> None:
        """A synchronous method went upstream: the channel is unsettled until its reply."""
        self.requests.append(self.published)

    def reply_received(self) -> None:
        if self.requests:
            self.requests.popleft()

    @property
    def pending_replies(self) -> int:
        return len(self.requests)

    @property
    def unconfirmed(self) -> int:
        return self.published - self.confirmed - len(self.confirmed_ahead)

    @property
    def settled(self) -> bool:
        """OpenOk, every reply and every confirm have arrived: nothing more can come for a past
        lease, so the channel may be handed to another client."""
        return (
            self.state is ChannelState.OPEN and self.pending_replies == 0 and self.unconfirmed == 0
        )

    @property
    def reusable(self) -> bool:
        return self.dirty is None and self.state is not ChannelState.CLOSING

    def mark_dirty(self, reason: str) -> None:
        if self.dirty is None:
            self.dirty = reason


class LeaseState(enum.Enum):
    OPENING = "opening"  # waiting for an upstream channel
    OPEN = "open"
    CLOSING = "closing"  # the client's Channel.Close went upstream; waiting for CloseOk
    BROKER_CLOSED = "broker-closed"  # broker closed it; discard until the client's CloseOk
    CROSSED = "crossed"  # both closed at once: the broker's CloseOk answers the client's Close,
    #                      the client's CloseOk the broker's; the lease ends when both came


class Lease:
    """A client channel bound to an upstream channel for the life of the client channel."""

    __slots__ = (
        "announced",
        "backlog",
        "backlog_size",
        "channel_id",
        "client",
        "client_close_ok_due",
        "client_confirm",
        "confirm_offset",
        "declares",
        "message",
        "owner",
        "state",
        "tag_offset",
        "totals",
        "up",
        "verbatim",
    )

    def __init__(self, client: Client, owner: Releaser, channel_id: int, totals: Totals) -> None:
        self.client = client
        self.owner = owner  # the pool: a client that moved (UpdateSecret) keeps its old leases
        self.channel_id = channel_id
        self.up: UpstreamChannel | None = None
        self.state = LeaseState.OPENING
        self.client_confirm = False  # this client selected confirm mode
        self.confirm_offset = 0  # broker confirm tag = client tag + confirm_offset
        self.tag_offset = 0  # broker delivery tag = client tag + tag_offset
        self.message = Assembly()  # the message the client is sending on this channel
        self.verbatim = False  # frames pass with no rewrite: same id, fitting frame sizes
        self.declares: deque[bool] = deque()  # pending Queue.Declare: exclusive or not
        self.backlog: list[bytes] | None = []  # client frames that arrived before ``up``
        self.announced = False  # the client has its OpenOk although ``up`` is not bound yet
        self.backlog_size = 0
        self.totals = totals  # the backlog counts toward the outbox limit
        self.client_close_ok_due = False  # CROSSED: the client still owes its CloseOk

    def bind(self, up: UpstreamChannel) -> None:
        """Take ``up`` for this lease; later tags are translated relative to its counters."""
        self.up = up
        up.lease = self
        up.conn.on_lease_change(+1)
        up.last_client = self.client.identity
        self.tag_offset = up.delivered
        self.state = LeaseState.OPEN
        # Client frames fit upstream as they are (broker bodies are checked frame by frame).
        self.verbatim = up.id == self.channel_id and self.client.frame_max <= up.conn.frame_max

    @property
    def holds_channel_state(self) -> bool:
        """Its upstream channel carries what a move to another channel would lose: a consumer,
        qos, tx or flow (``dirty``), a reply due, or deliveries whose tags the client holds."""
        up = self.up
        return up is not None and (
            up.dirty is not None or bool(up.requests) or up.delivered != self.tag_offset
        )

    @property
    def detachable(self) -> bool:
        """The lease can wait for another upstream channel when its connection dies, unseen by
        its client: nothing it sent is waiting for an answer but publishes the proxy answers
        for (no client confirms, no reply due, nothing left on the channel). A message half
        read goes with it when its kept frames are the client's own bytes (``verbatim``)."""
        up = self.up
        return (
            up is not None
            and self.state is LeaseState.OPEN
            and not self.client_confirm
            and (self.message.stage is Stage.NONE or self.verbatim)
            and not self.declares
            and up.confirm_mode
            and up.dirty is None
            and not up.requests
        )

    def unbind(self) -> None:
        """Let go of the upstream channel (which stays, parks or closes: the caller decides)."""
        up = self.up
        self.up = None
        if up is not None and up.lease is self:
            up.lease = None
            if not up.conn.closed:
                up.conn.on_lease_change(-1)

    def detach(self) -> None:
        """Forget the dead upstream channel; frames wait in the backlog for the next one, the
        part of a message read so far first (none of it went upstream: a message goes once
        whole), as the client sent it."""
        partial = self.message.take() if self.message.stage is not Stage.NONE else []
        self.message.drop()
        self.reopen()
        if partial:
            self.queue_frame(b"".join(partial))

    def queue_frame(self, frame: bytes) -> int:
        """Keep a frame that arrived before the upstream channel; returns the backlog size."""
        assert self.backlog is not None
        self.backlog.append(frame)
        self.backlog_size += len(frame)
        self.totals.add(len(frame), 0)
        return self.backlog_size

    def take_backlog(self) -> tuple[bytes, int]:
        """The frames kept so far, joined, and the bytes they counted toward the outbox limit:
        the caller uncounts them once it has passed them on (so that the limit never sees them
        leave before they arrive where they go)."""
        backlog, self.backlog = self.backlog, None
        size, self.backlog_size = self.backlog_size, 0
        return (b"".join(backlog) if backlog else b""), size

    def close_sent(self) -> None:
        """The client's Channel.Close goes upstream: the broker's CloseOk ends the lease."""
        self.state = LeaseState.CLOSING
        if self.up is not None:
            self.up.state = ChannelState.CLOSING

    def closed_by_broker(self) -> None:
        """The broker closed the channel. If the client's Close crossed the broker's, the
        lease ends once both CloseOks came; else it lets go of the channel at once, and
        discards what the client sends until its CloseOk."""
        self.declares.clear()
        self.message.drop()
        if self.state is LeaseState.CLOSING:
            self.state = LeaseState.CROSSED
            self.client_close_ok_due = True
        else:
            self.unbind()
            self.state = LeaseState.BROKER_CLOSED

    def refused(self) -> None:
        """The proxy closed the channel with an error of its own (its upstream channel is
        released by then); like the broker, it discards frames until the client's CloseOk."""
        self.message.drop()
        self.state = LeaseState.BROKER_CLOSED

    def reopen(self) -> None:
        """The lease moves to a new upstream channel (released by then): frames wait in the
        backlog until it is bound; the client already has its OpenOk."""
        self.up = None
        self.state = LeaseState.OPENING
        self.announced = True
        self.backlog = []
