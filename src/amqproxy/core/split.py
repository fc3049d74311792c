"""When a client channel moves from a publish connection to a consume connection (``roles``).

A channel moves when its client first does something a consumer does — ``Basic.Consume``,
``Basic.Qos`` with a prefetch (it comes before the consume), ``Basic.Get`` with acks, an
exclusive ``Queue.Declare`` (the queue must live where its consumer will be) — or names an
exclusive queue of its own that lives on a consume connection. It moves only when nothing is
left behind that its client could miss: the channel table then gives the upstream channel
back and continues on one of a consume connection, the method first (``_swap_upstream``).
Otherwise it stays where it is, as on a direct connection that consumes where it publishes.

While the broker blocks a publish connection (``Connection.Blocked``: an alarm), it reads
nothing more from it, declarations included; a consumer that declares its queue before it
consumes would wait for the alarm to end. So on a blocked publish connection any method but a
publish moves the channel too, for now (``tentative``): if the channel then publishes while it
could still move unnoticed, it goes back to a publish connection, the publish first.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from amqproxy.amqp import constants as c
from amqproxy.channel import Connection, Lease, LeaseState, UpstreamChannel
from amqproxy.core.policy import ALWAYS_REPLIED, NOWAIT_METHODS, QUEUE_METHODS
from amqproxy.core.publish import Stage
from amqproxy.core.session import Session
from amqproxy.roles import CONSUME, PUBLISH

# Methods whose empty queue name means the queue last declared on the channel: a new
# upstream channel would not know it.
_LAST_QUEUE = frozenset({c.BASIC_CONSUME, c.BASIC_GET})
# What a blocked publish connection would keep from the broker, besides publishes (not the
# tx methods: a channel in a transaction does not move).
_WHILE_BLOCKED = NOWAIT_METHODS | (ALWAYS_REPLIED - {c.TX_SELECT, c.TX_COMMIT, c.TX_ROLLBACK})


class Move(NamedTuple):
    """Move the lease to a consume connection, ``near`` this one if it has room;
    ``tentative``: back to a publish connection if it publishes (``Split.tentative``)."""

    near: Connection | None
    tentative: bool = False


def consumer_like(mid: int, args: dict[str, Any]) -> bool:
    """A method that consumers send and publishers do not."""
    if mid == c.BASIC_CONSUME:
        return True
    if mid == c.BASIC_QOS:
        return bool(args["prefetch_count"] or args["prefetch_size"])
    if mid == c.BASIC_GET:
        return not args["no_ack"]
    if mid == c.QUEUE_DECLARE:
        return bool(args["exclusive"] and not args["passive"])
    return False


def movable(lease: Lease, up: UpstreamChannel) -> bool:
    """Nothing on ``up`` that its client could miss on another channel: no publish since the
    client selected confirms, if it did (its next tag is 1 on any channel), no message half
    sent, no reply or confirm due (order), no delivery seen (its tags), no state on the
    channel (qos, consumer, tx, flow, an exclusive queue)."""
    return (
        lease.state is LeaseState.OPEN
        and (not lease.client_confirm or up.published == lease.confirm_offset)
        and lease.message.stage is Stage.NONE
        and not lease.declares
        and up.confirm_mode
        and not lease.holds_channel_state
        and up.unconfirmed == 0
    )


class Split:
    """One client's consume connection (sticky: its consumers and exclusive queues share
    it), and the decision to move a channel there."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.sticky: Connection | None = None
        # Leases moved while their publish connection was blocked, not consumers (yet): their
        # frames take the slow path, which sends them back when they publish.
        self.tentative: set[Lease] = set()

    def bound(self, up: UpstreamChannel) -> None:
        """A lease of this client was bound to ``up``."""
        if up.conn.role == CONSUME:
            self.sticky = up.conn

    def move(
        self,
        lease: Lease,
        up: UpstreamChannel,
        mid: int,
        args: dict[str, Any],
        owned: dict[bytes, Connection],
    ) -> Move | None:
        """Where ``lease`` goes before ``mid`` is sent: a Move, or None to stay. ``owned``: the
        client's exclusive queues and their connections."""
        session = self.session
        pool = session.pool
        if pool is None or not session.settings.split_consumers or up.conn.role != PUBLISH:
            return None
        queue = args.get("queue", b"") if mid in QUEUE_METHODS else b""
        owner = owned.get(queue) if queue else None
        tentative = False
        if owner is not None:
            # Its own exclusive queue is reachable only from the connection it lives on.
            if owner is up.conn or owner.role != CONSUME or not owner.open:
                return None
            near: Connection | None = owner
        elif consumer_like(mid, args) and (queue or mid not in _LAST_QUEUE):
            near = self._sticky()
        elif up.conn.blocked_reason is not None and mid in _WHILE_BLOCKED:
            near, tentative = self._sticky(), True
        else:
            return None
        if lease.owner is not pool or not movable(lease, up) or not pool.roles.has_room(near):
            return None
        return Move(near, tentative)

    def _sticky(self) -> Connection | None:
        sticky = self.sticky
        return sticky if sticky is not None and sticky.open else None

    def back(self, lease: Lease) -> bool:
        """A tentative lease publishes: True if it goes back to a publish connection (it can
        move unnoticed), False if it stays, publishing where it is (and is tentative no
        more)."""
        self.tentative.discard(lease)
        up = lease.up
        if up is None or up.conn.role != CONSUME:  # its consume connection died meanwhile
            return False
        return movable(lease, up) and self.session.settings.split_consumers
