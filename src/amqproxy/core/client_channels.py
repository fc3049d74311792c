"""A client's channels: its leases, and the methods on them the proxy acts on.

Opening (a parked channel, a new one at once, or one that waits for the broker during an
outage), closing in each direction and crossed, the channel errors the proxy answers itself
(another client's exclusive queue), and the bookkeeping that decides whether an upstream
channel may be parked for the next client (docs/ARCHITECTURE.md, "The lease lifecycle").
Lease and channel state change only through their own methods (``amqproxy.channel``).
"""

from __future__ import annotations

import logging
from typing import Any

from pamqp import commands

from amqproxy.amqp import auth, frames
from amqproxy.amqp import constants as c
from amqproxy.amqp.frames import Buffer, FrameError
from amqproxy.channel import Connection, Lease, LeaseState, UpstreamChannel
from amqproxy.core.policy import (
    ALWAYS_REPLIED,
    DIRTYING,
    NOWAIT_METHODS,
    QUEUE_METHODS,
    Verdict,
)
from amqproxy.core.session import Session
from amqproxy.core.split import Move, Split
from amqproxy.outbox import publishes_in

log = logging.getLogger("amqproxy.client")
# Tx.Select on a channel the proxy cannot move to one without its confirm mode.
TX_AFTER_STATE = (
    "PRECONDITION_FAILED - amqproxy: select tx before consuming, qos or a pending request on "
    "a channel (its state cannot move to a channel without the proxy's confirm mode)"
)

MAX_BACKLOG = 4 * 1024 * 1024  # frames a client sent on a channel still opening upstream


class ChannelTable:
    """The client channels of one session, by the client's channel id."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.leases: dict[int, Lease] = {}
        self.late_close_ok: set[int] = set()  # channels whose Close crossed the broker's
        self.exclusive_queues: dict[bytes, Connection] = {}  # declared here, die with us
        self.split = Split(session)  # consumers apart from publishers (``roles``)

    def _end(self, lease: Lease) -> None:
        if self.leases.get(lease.channel_id) is lease:
            del self.leases[lease.channel_id]
        self.split.tentative.discard(lease)

    # ---- opening ------------------------------------------------------------------------------

    def open(self, ftype: int, channel_id: int, data: bytes, start: int) -> None:
        """A frame on a channel id without a lease: Channel.Open takes a parked channel or a
        new upstream one at once; while an outage is held, OpenOk comes at once and the
        channel waits for the broker."""
        mid = frames.method_id_at(data, start) if ftype == c.FRAME_METHOD else 0
        if channel_id in self.late_close_ok:
            self.late_close_ok.discard(channel_id)
            if mid == c.CHANNEL_CLOSE_OK:
                return
        if mid == c.CHANNEL_CLOSE:  # closed already (a second Close): RabbitMQ answers CloseOk
            self.session.host.write(frames.method_frame(channel_id, frames.CHANNEL_CLOSE_OK))
            return
        if mid != c.CHANNEL_OPEN:
            raise FrameError(
                c.CHANNEL_ERROR, f"CHANNEL_ERROR - expected 'channel.open' on channel {channel_id}"
            )
        session = self.session
        if channel_id > session.channel_max:
            raise FrameError(
                c.NOT_ALLOWED,
                f"NOT_ALLOWED - channel {channel_id} is above the negotiated channel_max "
                f"{session.channel_max}",
            )
        pool = session.pool
        assert pool is not None
        lease = Lease(session, pool, channel_id, session.registry.outbox)
        self.leases[channel_id] = lease
        # Clients already waiting at --max-upstream-connections are served first.
        up = None if pool.room else pool.take_parked(channel_id) or pool.open_now(channel_id)
        if up is not None:
            lease.backlog = None
            lease.bind(up)
            self.session.host.write(frames.method_frame(channel_id, frames.CHANNEL_OPEN_OK))
            return
        if pool.holding():
            lease.announced = True
            self.session.host.write(frames.method_frame(channel_id, frames.CHANNEL_OPEN_OK))
        session.host.open_channel(pool, lease, True)

    def ready(self, lease: Lease, up: UpstreamChannel) -> tuple[bytes, int]:
        """``up`` opened for ``lease``: bind it and announce it if the client still waits
        for its OpenOk. Returns what the client sent meanwhile (and the bytes it counted
        toward the outbox limit) for the session to pass on."""
        lease.bind(up)
        if not self.session.is_open or self.leases.get(lease.channel_id) is not lease:
            lease.owner.release(lease, "opened after its client left")
            return b"", 0
        self.split.bound(up)
        if lease.client_confirm:  # it moved (``core.split``) before it published: tag 1 next
            lease.confirm_offset = up.published
        if not lease.announced:
            lease.announced = True
            self.session.host.write(frames.method_frame(lease.channel_id, frames.CHANNEL_OPEN_OK))
        return lease.take_backlog()

    def open_refused(self, lease: Lease, code: int, text: str) -> None:
        """No upstream channel for ``lease`` in time (its pool is at its connection limit):
        Channel.Close on this channel, as a broker refuses one; the connection and its other
        channels carry on. What the client sent behind its Open is dropped, unless it had its
        OpenOk already (an outage was held): its publishes are then the proxy's to deliver."""
        if not lease.announced:
            _, counted = lease.take_backlog()
            self.session.registry.outbox.remove(counted, 0)
        log.info(
            "client %s: channel %d refused: %s", self.session.describe(), lease.channel_id, text
        )
        self.refuse(lease, code, text, c.CHANNEL_OPEN)

    def not_open(self, lease: Lease, ftype: int, data: bytes, start: int, end: int) -> None:
        """A frame on a channel that is opening or closing."""
        state = lease.state
        if state is LeaseState.OPENING:
            if lease.announced and self._closed_while_waiting(lease, ftype, data, start):
                return
            if lease.queue_frame(data[start - c.FRAME_HEADER_SIZE : end + 1]) > MAX_BACKLOG:
                self.session.host.hold("backlog")  # released once the channel is bound
            return
        if ftype != c.FRAME_METHOD:
            return
        mid = frames.method_id_at(data, start)
        if state is LeaseState.CROSSED:
            if mid == c.CHANNEL_CLOSE_OK:  # for the broker's Close, answered upstream already
                lease.client_close_ok_due = False
                if lease.up is None:  # the broker's CloseOk came first
                    self._end(lease)
        elif state is LeaseState.BROKER_CLOSED:
            # Like a broker: everything is discarded until the client's CloseOk.
            if mid == c.CHANNEL_CLOSE_OK:
                self._end(lease)
            elif mid == c.CHANNEL_CLOSE:
                # Both sides closed at once: answer, and accept the CloseOk that may follow.
                self._end(lease)
                self.late_close_ok.add(lease.channel_id)
                self.session.host.write(
                    frames.method_frame(lease.channel_id, frames.CHANNEL_CLOSE_OK)
                )

    def _closed_while_waiting(self, lease: Lease, ftype: int, data: bytes, start: int) -> bool:
        """Channel.Close on a channel still waiting for its upstream (an outage is held): when
        the client sent nothing but whole publishes, the proxy answers for them now."""
        if ftype != c.FRAME_METHOD or frames.method_id_at(data, start) != c.CHANNEL_CLOSE:
            return False
        if lease.backlog and not publishes_in(b"".join(lease.backlog))[1]:
            return False  # it waits for replies: the Close waits its turn behind them
        self._end(lease)
        lease.owner.release(lease, "channel closed")
        self.session.host.write(frames.method_frame(lease.channel_id, frames.CHANNEL_CLOSE_OK))
        return True

    # ---- methods the proxy acts on ------------------------------------------------------------

    def on_method(
        self, lease: Lease, mid: int, args: dict[str, Any], data: bytes, start: int, end: int
    ) -> Verdict | Buffer:
        """A watched client method (``args``: its decoded arguments) on an open lease: forward
        it, drop it (answered here), or forward a new payload."""
        up = lease.up
        assert up is not None
        if mid == c.BASIC_ACK or mid == c.BASIC_NACK or mid == c.BASIC_REJECT:
            if lease.tag_offset:
                return frames.retag(data, start, end, start + 4, lease.tag_offset)
            return Verdict.FORWARD
        if mid == c.CHANNEL_CLOSE:
            return self._client_close(lease, up)
        if mid == c.CHANNEL_CLOSE_OK:
            return Verdict.DROP  # nothing of ours is waiting for it
        queue = args.get("queue", b"")
        if queue and mid in QUEUE_METHODS and self._locked_out(lease, up.conn, mid, queue):
            return Verdict.DROP
        if mid == c.TX_SELECT and up.confirm_mode and not lease.client_confirm:
            # Every upstream channel is in confirm mode, and the broker refuses confirm -> tx:
            # move this client channel to a fresh upstream channel, then select tx there -
            # unless the channel holds what a move would lose (a consumer, qos, deliveries).
            if lease.holds_channel_state:
                self.refuse(lease, c.PRECONDITION_FAILED, TX_AFTER_STATE, mid)
                return Verdict.DROP
            frame = data[start - c.FRAME_HEADER_SIZE : end + 1]
            self._swap_upstream(lease, frame, "client needs a channel without confirm mode", False)
            return Verdict.DROP
        if mid == c.CONFIRM_SELECT:
            return self._confirm_select(lease, up, args["nowait"])
        move = self.split.move(lease, up, mid, args, self.exclusive_queues)
        if move is not None:  # a consumer: to a consume connection, this method first
            frame = data[start - c.FRAME_HEADER_SIZE : end + 1]
            self._swap_upstream(lease, frame, "moved to a consume connection", True, move)
            if move.tentative:
                self.split.tentative.add(lease)
            return Verdict.DROP
        self._note_state(lease, up, mid, args)
        if up.dirty is not None and self.split.tentative:
            self.split.tentative.discard(lease)  # a consumer now: it stays
        if mid in ALWAYS_REPLIED or (mid in NOWAIT_METHODS and not args["nowait"]):
            up.request_sent()
        return Verdict.FORWARD

    def _client_close(self, lease: Lease, up: UpstreamChannel) -> Verdict:
        """The client closes its channel: a clean one is the proxy's to answer (and park)."""
        if up.reusable and self.session.settings.park_channels:
            self._end(lease)
            lease.owner.release(lease, "channel closed")
            self.session.host.write(frames.method_frame(lease.channel_id, frames.CHANNEL_CLOSE_OK))
            return Verdict.DROP
        lease.close_sent()
        return Verdict.FORWARD

    def _note_state(
        self, lease: Lease, up: UpstreamChannel, mid: int, args: dict[str, Any]
    ) -> None:
        """What the method leaves on the upstream channel: the next client must not get it."""
        reason = DIRTYING.get(mid)
        if mid == c.BASIC_QOS and (args["prefetch_count"] or args["prefetch_size"]):
            reason = "qos"
        elif mid == c.BASIC_GET and not args["no_ack"]:
            reason = "get with ack"
        elif mid == c.QUEUE_DECLARE:
            exclusive = args["exclusive"] and not args["passive"]
            if exclusive:
                reason = "exclusive queue"
            if not args["nowait"]:
                lease.declares.append(exclusive)  # its DeclareOk names the queue
            elif exclusive and args["queue"]:
                self.own_exclusive_queue(args["queue"], up.conn)
        if reason is not None:
            up.mark_dirty(reason)

    def _confirm_select(self, lease: Lease, up: UpstreamChannel, nowait: bool) -> Verdict:
        """The client selects confirms: from now on it sees acks, numbered from its tag 1."""
        if not lease.client_confirm:
            # The client's tag 1 is the broker's next one (publishes before Select included).
            lease.client_confirm = True
            lease.confirm_offset = up.published
        if up.confirm_mode:  # the proxy's own confirm mode: answer here
            if not nowait:
                self.session.host.write(
                    frames.method_frame(lease.channel_id, frames.CONFIRM_SELECT_OK)
                )
            return Verdict.DROP
        up.confirm_mode = True  # a channel without it (Tx): the broker answers, or refuses
        if not nowait:
            up.request_sent()
        return Verdict.FORWARD

    def _locked_out(self, lease: Lease, conn: Connection, mid: int, queue: bytes) -> bool:
        """``queue`` is another client's exclusive queue on this upstream connection: 405 on
        this channel, as from the broker. Deleting one's own exclusive queue ends its
        ownership."""
        owners = conn.exclusive_owners
        owner = owners.get(queue)
        session = self.session
        if owner is not None and owner is not session:
            self.refuse(
                lease,
                c.RESOURCE_LOCKED,
                f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue "
                f"'{auth.display(queue)}' in vhost '{session.vhost}'. It could be originally "
                "declared on another connection or the exclusive property value does not match "
                "that of the original declaration.",
                mid,
            )
            return True
        if mid == c.QUEUE_DELETE and owner is session:
            self.exclusive_queues.pop(queue, None)
            owners.pop(queue, None)
        return False

    def own_exclusive_queue(self, name: bytes, conn: Connection) -> None:
        """``name`` is an exclusive queue this client declared: it dies when the client leaves,
        and other clients on the connection get 405 for it, as on a direct connection."""
        self.exclusive_queues[name] = conn
        conn.exclusive_owners[name] = self.session

    def refuse(self, lease: Lease, code: int, text: str, mid: int) -> None:
        """Close a client channel the way the broker would, without involving the broker."""
        lease.owner.release(lease, "channel error answered by the proxy")
        lease.refused()
        close = commands.Channel.Close(code, frames.reply_text(text), mid >> 16, mid & 0xFFFF)
        self.session.host.write(frames.encode_method(lease.channel_id, close))

    def publishing(self, lease: Lease, pending_frame: bytes) -> bool:
        """A tentative lease (``Split.tentative``) publishes: True if it goes back to a
        publish channel with ``pending_frame`` first (the rest of the message follows it
        there), False if it publishes where it is."""
        if not self.split.back(lease):
            return False
        self._swap_upstream(lease, pending_frame, "publishes: back to a publish connection", True)
        return True

    def _swap_upstream(
        self, lease: Lease, pending_frame: bytes, why: str, confirm: bool, move: Move | None = None
    ) -> None:
        """Give back the lease's upstream channel and continue on a new one, with
        ``pending_frame`` first on it: without confirm mode (``confirm`` False: the client's
        Tx.Select), or in the proxy's confirm mode on a publish connection, or on a consume
        connection (``move``)."""
        lease.owner.release(lease, why)
        lease.reopen()
        lease.queue_frame(pending_frame)
        pool = self.session.pool
        assert pool is not None
        if move is None:
            self.session.host.open_channel(pool, lease, confirm)
        else:
            self.session.host.open_channel(pool, lease, confirm, True, move.near)

    # ---- what the upstream side reports -------------------------------------------------------

    def closed_by_broker(self, lease: Lease, close_payload: bytes) -> None:
        """The broker closed this lease's channel: tell the client, discard until CloseOk.

        When the client's own Close is on its way upstream, the two crossed: as RabbitMQ does,
        the client gets the broker's Close now and the CloseOk for its Close when the broker
        sends it (the lease stays bound until then)."""
        lease.closed_by_broker()
        self.session.host.write(frames.encode(c.FRAME_METHOD, lease.channel_id, close_payload))

    def closed_upstream(self, lease: Lease) -> None:
        """The broker answered the client's own Channel.Close."""
        lease.unbind()
        self.session.host.write(frames.method_frame(lease.channel_id, frames.CHANNEL_CLOSE_OK))
        if not lease.client_close_ok_due:  # crossed: the lease ends with the client's CloseOk
            self._end(lease)

    def upstream_lost(self, leases: list[Lease], code: int, text: str, hold: bool) -> None:
        """The upstream connection under ``leases`` died. A client that only publishes without
        confirms does not notice: its channels wait for a new upstream channel (the outage hold)
        and the proxy replays what the broker did not confirm. Anyone else gets the close."""
        if not hold or not all(lease.detachable for lease in leases):
            self.session.close_with(code, text)
            return
        pool = self.session.pool
        assert pool is not None
        for lease in leases:
            lease.detach()
            self.session.host.open_channel(pool, lease, True)

    def release_all(self, why: str) -> None:
        """The client is leaving: give back its channels, delete its exclusive queues."""
        leases, self.leases = self.leases, {}
        self.split.tentative.clear()
        for lease in leases.values():
            lease.owner.release(lease, why)
        queues, self.exclusive_queues = self.exclusive_queues, {}
        for name, conn in queues.items():
            if conn.exclusive_owners.get(name) is self.session:
                del conn.exclusive_owners[name]
            log.debug("deleting exclusive queue %r of client %s", name, self.session.describe())
            conn.delete_queue(name, "amqproxy: exclusive queue owner left")
