"""Redelivery: the outbox messages of one pool that wait for an upstream channel.

Messages the proxy answered for (a client's CloseOk, a publish without client confirms) are
the proxy's to deliver (docs/ARCHITECTURE.md, "Where each guarantee is enforced"): after their
channel or connection died they are published again, in order; while the broker is away they
wait, and the pool reconnects with growing pauses; what the broker refuses (a nack, a channel
error naming the publish, credentials no longer accepted) is logged and counted, never
retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Protocol

from amqproxy.amqp import constants as c
from amqproxy.amqp.frames import Buffer
from amqproxy.channel import Client, Connection, Lease, UpstreamChannel
from amqproxy.errors import UpstreamRefused
from amqproxy.outbox import MAX_ATTEMPTS, Message, Totals, publishes_in, refused_index, unconfirmed

log = logging.getLogger("amqproxy.pool")

RETRY_FIRST = 0.1  # first pause between reconnection attempts while messages wait
RETRY_MAX = 1.0  # the pause grows to this


class Registry(Protocol):
    outbox: Totals
    stopped: bool  # shutting down: no more reconnection attempts


class Stats(Protocol):
    replayed: int
    refused: int
    orphan_channel_errors: int


class PoolSide(Protocol):
    """What redelivery needs of its pool (``pool.Pool``)."""

    user: str
    vhost: str

    @property
    def registry(self) -> Registry: ...

    @property
    def stats(self) -> Stats: ...

    clients: set[Client]
    upstreams: list[Connection]

    @property
    def waiters(self) -> int:
        """Client channels waiting for the broker."""

    def take_parked(self, preferred: int = 0) -> UpstreamChannel | None: ...

    def open_now(self, preferred: int = 0, confirm: bool = True) -> UpstreamChannel | None: ...

    def settle_or_park(self, up: UpstreamChannel, why: str) -> None: ...

    def live_upstream(self) -> Connection | None: ...

    async def more_room(self) -> None:
        """A new connection, or at the connection limit a wait for a channel to be freed."""


class Redelivery:
    """The waiting messages of one pool, and the task that reconnects for them."""

    def __init__(self, pool: PoolSide) -> None:
        self.pool = pool
        self.pending: deque[Message] = deque()
        self._recovery: asyncio.Task[None] | None = None

    def adopt_backlog(self, lease: Lease) -> None:
        """A client left a channel that never got its upstream (an outage was held): its whole
        publishes are the proxy's now, the rest of what it sent is dropped."""
        data, counted = lease.take_backlog()
        now = asyncio.get_running_loop().time()
        origin = lease.client.identity
        messages = [
            Message(method, header, body, origin, now, 0)
            for method, header, body in publishes_in(data)[0]
        ]
        if messages:
            log.debug("%d message(s) of %s wait for the broker", len(messages), origin)
            self.enqueue(messages)
        self.pool.registry.outbox.remove(counted, 0)

    def enqueue(self, messages: list[Message]) -> None:
        """Messages to publish on a channel of this pool as soon as there is one, in order."""
        totals = self.pool.registry.outbox
        for message in messages:
            if message.attempts >= MAX_ATTEMPTS:
                self._refused(message, 0, f"lost its channel {message.attempts} times")
                continue
            self.pending.append(message)
            totals.add(message.size, 1)
        if self.pending and not self.send_pending():
            self.ensure_recovery()

    def send_pending(self) -> bool:
        """Publish the waiting messages on one channel; False when there is no channel yet."""
        if not self.pending:
            return True
        up = self.pool.take_parked() or self.pool.open_now()
        if up is None:
            return False
        conn = up.conn
        pieces: list[Buffer] = []
        replayed = 0
        totals = self.pool.registry.outbox
        while self.pending:
            message = self.pending.popleft()
            totals.remove(message.size, 1)
            frames = message.frames(up.id, conn.frame_max)
            up.published += 1
            up.outbox.add(
                up.published, 1, tuple(frames), message.origin, message.since, message.attempts + 1
            )
            pieces.extend(frames)
            replayed += message.attempts > 0
        up.last_client = "amqproxy outbox"
        conn.send(pieces)
        self.pool.stats.replayed += replayed
        if replayed:
            log.info("replayed %d message(s) on upstream %s channel %d", replayed, conn.name, up.id)
        self.pool.settle_or_park(up, "outbox sent")
        return True

    def ensure_recovery(self) -> None:
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(
                self._recover(), name=f"recover {self.pool.user}@{self.pool.vhost}"
            )

    async def _recover(self) -> None:
        """Reconnect while messages or clients wait for the broker, pausing between attempts."""
        delay = RETRY_FIRST
        while (self.pending or self.pool.waiters) and not self.pool.registry.stopped:
            if self.send_pending() and self.pool.live_upstream() is not None:
                return
            try:
                await self.pool.more_room()
                delay = RETRY_FIRST
            except UpstreamRefused as exc:
                if exc.code != c.CONNECTION_FORCED:  # the credentials or vhost are refused:
                    self._give_up(exc)  # these messages cannot be delivered any more
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX)

    def _give_up(self, exc: UpstreamRefused) -> None:
        totals = self.pool.registry.outbox
        while self.pending:
            message = self.pending.popleft()
            totals.remove(message.size, 1)
            self._refused(message, exc.code, exc.text)

    def upstream_lost(self, up: UpstreamChannel) -> None:
        """``up`` died with its connection: publish its unconfirmed messages again."""
        entries = up.outbox.take()
        if entries:
            self.enqueue(self._messages(unconfirmed(entries, up.confirmed, up.confirmed_ahead)))

    def channel_closed_by_broker(
        self,
        up: UpstreamChannel,
        reply_code: int,
        reply_text: str,
        failed_method: int,
        *,
        orphan: bool,
    ) -> None:
        """The broker closed ``up``: settle its outbox, and say so once in the log when the
        client that caused it has left (``orphan``).

        The broker handles a channel's frames in order and discards those after the failing
        one, so: publishes before it were processed, the failing publish is refused (logged,
        counted), those after it are published again. When the failing method cannot be
        placed among the publishes, every unconfirmed one is published again.
        """
        if orphan:
            self.pool.stats.orphan_channel_errors += 1
        entries = up.outbox.take()
        messages = unconfirmed(entries, up.confirmed, up.confirmed_ahead) if entries else []
        refused: Message | None = None
        if not messages:
            again = messages
        elif failed_method == c.BASIC_PUBLISH:
            index = refused_index(messages, reply_text)
            refused = messages[index][1]
            again = messages[index + 1 :]
        elif up.requests:  # the oldest unanswered request failed: what came before it is done
            boundary = up.requests[0]
            again = [(tag, message) for tag, message in messages if tag > boundary]
        else:
            again = messages
        if refused is not None:
            self._refused(refused, reply_code, reply_text, after_left=orphan)
        elif orphan:
            log.warning(
                "channel error after its client left (client %s, upstream %s channel %d): %d %s",
                up.last_client or "?",
                up.conn.name,
                up.id,
                reply_code,
                reply_text,
                extra={"event": "channel.orphan_error", "client": up.last_client,
                       "upstream": up.conn.name, "code": reply_code, "reason": reply_text},
            )  # fmt: skip
        if again:
            self.enqueue(self._messages(again))

    def nacked(self, up: UpstreamChannel, tag: int, multiple: bool) -> None:
        """The broker nacked publishes of ``up``: those the proxy answered for are refused."""
        low = up.confirmed if multiple else tag - 1
        for entry in up.outbox.entries:
            if entry.last_tag - entry.count >= tag:
                break
            for message_tag, message in entry.messages():
                if low < message_tag <= tag and message_tag not in up.confirmed_ahead:
                    self._refused(message, 0, "nacked by the broker")

    @staticmethod
    def _messages(tagged: list[tuple[int, Message]]) -> list[Message]:
        return [message for _tag, message in tagged]

    def _refused(self, message: Message, code: int, text: str, after_left: bool = True) -> None:
        self.pool.stats.refused += 1
        log.warning(
            "message of client %s to exchange %r refused by the broker%s: %s%s",
            message.origin,
            message.exchange,
            " after the client left" if after_left else "",
            f"{code} " if code else "",
            text,
            extra={"event": "message.refused", "client": message.origin, "code": code,
                   "reason": text, "pool": f"{self.pool.user}@{self.pool.vhost}"},
        )  # fmt: skip

    def counts(self) -> tuple[int, int, float | None]:
        """(messages, bytes, oldest acceptance time) of this pool's outbox."""
        messages = len(self.pending)
        size = sum(message.size for message in self.pending)
        size += sum(
            lease.backlog_size for client in self.pool.clients for lease in client.leases.values()
        )
        oldest = self.pending[0].since if self.pending else None
        for conn in self.pool.upstreams:
            for up in conn.channels.values():
                outbox = up.outbox
                if outbox:
                    messages += outbox.count
                    size += outbox.size
                    since = outbox.oldest()
                    if since is not None and (oldest is None or since < oldest):
                        oldest = since
        return messages, size, oldest
