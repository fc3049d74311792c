"""Upstream channels and the leases that bind them to client channels: state and cleanliness.

An UpstreamChannel outlives its leases: it remembers what the broker counts per channel
(confirm sequence numbers, delivery tags) so that the next lease can translate tags, what makes
it unfit for reuse (DESIGN.md section 4), and the publishes it carried that the broker has not
confirmed yet (its outbox). No I/O here.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import TYPE_CHECKING

from amqproxy.outbox import ChannelOutbox, Totals

if TYPE_CHECKING:
    from amqproxy.client import ClientConnection
    from amqproxy.upstream import UpstreamConnection


class ChannelState(enum.Enum):
    OPENING = "opening"  # Channel.Open sent upstream (leases use it at once), OpenOk not yet seen
    OPEN = "open"  # leased, parked or settling
    CLOSING = "closing"  # Channel.Close sent upstream, CloseOk not yet seen


class UpstreamChannel:
    """One channel on an upstream connection."""

    __slots__ = (
        "conn",
        "id",
        "state",
        "lease",
        "confirm_mode",
        "published",
        "confirmed",
        "confirmed_ahead",
        "delivered",
        "dirty",
        "last_client",
        "settling_since",
        "requests",
        "outbox",
    )

    def __init__(self, conn: UpstreamConnection, channel_id: int, totals: Totals) -> None:
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
        "client",
        "channel_id",
        "up",
        "state",
        "client_confirm",
        "confirm_offset",
        "tag_offset",
        "pub_frames",
        "pub_stage",
        "pub_remaining",
        "pub_start",
        "backlog",
        "verbatim",
        "declares",
        "announced",
        "backlog_size",
        "totals",
        "client_close_ok_due",
    )

    PUB_NONE = 0
    PUB_HEADER = 1  # Basic.Publish seen, waiting for the content header
    PUB_BODY = 2  # header seen, body bytes still to come

    def __init__(self, client: ClientConnection, channel_id: int, totals: Totals) -> None:
        self.client = client
        self.channel_id = channel_id
        self.up: UpstreamChannel | None = None
        self.state = LeaseState.OPENING
        self.client_confirm = False  # this client selected confirm mode
        self.confirm_offset = 0  # broker confirm tag = client tag + confirm_offset
        self.tag_offset = 0  # broker delivery tag = client tag + tag_offset
        self.pub_frames: list[bytes | bytearray | memoryview] = []  # a message being assembled
        self.pub_stage = Lease.PUB_NONE
        self.pub_remaining = 0
        self.pub_start = 0  # where the current read's part of that message begins
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
    def detachable(self) -> bool:
        """The lease can wait for another upstream channel when its connection dies, unseen by
        its client: nothing it sent is waiting for an answer but publishes the proxy answers
        for (no client confirms, no reply due, no message half sent, nothing left on the
        channel)."""
        up = self.up
        return (
            up is not None
            and self.state is LeaseState.OPEN
            and not self.client_confirm
            and self.pub_stage == Lease.PUB_NONE
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
        """Forget the dead upstream channel; frames wait in the backlog for the next one."""
        self.up = None
        self.state = LeaseState.OPENING
        self.announced = True
        self.backlog = []

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

    def drop_partial_publish(self) -> None:
        """Forget a message the client did not complete: it never goes upstream."""
        self.pub_frames = []
        self.pub_stage = Lease.PUB_NONE
        self.pub_remaining = 0
