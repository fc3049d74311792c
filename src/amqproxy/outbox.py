"""The outbox: publishes the proxy answered for, kept until the broker has them.

Every upstream channel runs in publisher-confirm mode, selected by the proxy. A publish of a
client that did not select confirms itself is kept here, per upstream channel and in publish
(= confirm tag) order, from the moment it goes upstream until the broker settles it: an ack
(delivered), a nack or a channel error it caused (refused: logged and counted, never retried),
or the channel's CloseOk (the broker processed everything before the close). When the channel
or the connection dies first, the unconfirmed messages are taken out as ``Message`` objects and
published again on another channel of the same pool: at-least-once, never silently lost.

Stored frames are the bytes that went upstream (a run of whole messages, possibly with client
acks between them); they are only parsed again when a message must be replayed or refused.
No I/O here.
"""

from __future__ import annotations

import re
import struct
import time
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple, Protocol

from amqproxy.amqp import constants as c
from amqproxy.amqp.frames import Buffer, encode

MAX_ATTEMPTS = 5  # a message that loses its channel this often is given up as refused
RESUME_AT = 0.9  # a full outbox admits publishers again below this share of its limit

_HEADER = struct.Struct(">BHI")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_EXCHANGE_IN_TEXT = re.compile(r"exchange '(.*)' in vhost '")


class Message(NamedTuple):
    """One publish taken out of the outbox: the payloads of its frames and where it came from."""

    method: bytes  # Basic.Publish payload
    header: bytes  # content header payload
    body: bytes
    origin: str  # the client that published it, for logs
    since: float  # when the proxy accepted it (time.monotonic)
    attempts: int  # how many channels it was sent on already

    @property
    def size(self) -> int:
        return len(self.method) + len(self.header) + len(self.body) + 3 * c.FRAME_OVERHEAD

    @property
    def exchange(self) -> str:
        length = self.method[6]
        return self.method[7 : 7 + length].decode("utf-8", "replace")

    def frames(self, channel: int, frame_max: int) -> list[bytes]:
        """The message as frames on ``channel``, bodies split to ``frame_max``."""
        out = [
            encode(c.FRAME_METHOD, channel, self.method),
            encode(c.FRAME_HEADER, channel, self.header),
        ]
        step = frame_max - c.FRAME_OVERHEAD
        body = self.body
        for pos in range(0, len(body), step):
            out.append(encode(c.FRAME_BODY, channel, body[pos : pos + step]))
        return out


class Entry:
    """Frames that went upstream together: ``count`` publishes whose last tag is ``last_tag``."""

    __slots__ = ("attempts", "count", "frames", "last_tag", "origin", "since", "size")

    def __init__(
        self,
        last_tag: int,
        count: int,
        frames: tuple[Buffer, ...],
        size: int,
        origin: str,
        since: float,
        attempts: int,
    ) -> None:
        self.last_tag = last_tag
        self.count = count
        self.frames = frames
        self.size = size
        self.origin = origin
        self.since = since
        self.attempts = attempts

    def messages(self) -> Iterator[tuple[int, Message]]:
        """(confirm tag, message) for each publish in the stored frames."""
        parts = publishes_in(b"".join(self.frames))[0]
        first = self.last_tag - self.count + 1
        for tag, (method, header, body) in enumerate(parts, first):
            yield tag, Message(method, header, body, self.origin, self.since, self.attempts)


def publishes_in(data: bytes) -> tuple[list[tuple[bytes, bytes, bytes]], bool]:
    """The whole Basic.Publish messages in ``data`` (complete frames of one channel) as
    (method, header, body) payloads, and whether that was all there was: False when other
    methods or an unfinished message were among the frames."""
    found: list[tuple[bytes, bytes, bytes]] = []
    only_publishes = True
    method = header = b""
    body: list[bytes] = []
    remaining = -1  # body bytes the current message still expects; -1: no header yet
    pos = 0
    while pos + c.FRAME_HEADER_SIZE <= len(data):
        ftype, _channel, size = _HEADER.unpack_from(data, pos)
        payload = data[pos + c.FRAME_HEADER_SIZE : pos + c.FRAME_HEADER_SIZE + size]
        pos += size + c.FRAME_OVERHEAD
        if ftype == c.FRAME_METHOD:
            if method:
                only_publishes = False  # the previous message never finished
            method = b""
            if len(payload) >= 4 and _U32.unpack_from(payload)[0] == c.BASIC_PUBLISH:
                method, header, body, remaining = payload, b"", [], -1
            else:
                only_publishes = False
            continue
        if not method:
            continue
        if ftype == c.FRAME_HEADER and remaining < 0 and len(payload) >= 12:
            header, remaining = payload, _U64.unpack_from(payload, 4)[0]
        elif ftype == c.FRAME_BODY and remaining > 0:
            body.append(payload)
            remaining -= len(payload)
        if remaining == 0:
            found.append((method, header, b"".join(body)))
            method = b""
    return found, only_publishes and not method


class Waiter(Protocol):
    """A client held back while the outbox is full."""

    def outbox_ready(self) -> None: ...


class Totals:
    """What every outbox of the proxy holds together, against ``--outbox-max-bytes``.

    Above the limit the outbox is full: clients that add to it are held (they stop being read)
    until it is back below ``RESUME_AT`` of the limit. Nothing is ever dropped.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.messages = 0
        self.full = False
        self._full_since = 0.0
        self._full_seconds = 0.0
        self.waiters: set[Waiter] = set()

    def add(self, size: int, count: int) -> None:
        self.bytes += size
        self.messages += count
        if not self.full and self.bytes > self.max_bytes:
            self.full = True
            self._full_since = time.monotonic()

    def remove(self, size: int, count: int) -> None:
        self.bytes -= size
        self.messages -= count
        if self.full and self.bytes <= self.max_bytes * RESUME_AT:
            self.full = False
            self._full_seconds += time.monotonic() - self._full_since
            waiters, self.waiters = self.waiters, set()
            for waiter in waiters:
                waiter.outbox_ready()

    @property
    def full_seconds(self) -> float:
        """Seconds spent full so far (for the metric)."""
        extra = time.monotonic() - self._full_since if self.full else 0.0
        return self._full_seconds + extra


class ChannelOutbox:
    """The unconfirmed publishes of one upstream channel, in tag order."""

    __slots__ = ("count", "entries", "size", "totals")

    def __init__(self, totals: Totals) -> None:
        self.entries: deque[Entry] = deque()
        self.size = 0
        self.count = 0
        self.totals = totals

    def __bool__(self) -> bool:
        return bool(self.entries)

    def add(
        self,
        last_tag: int,
        count: int,
        frames: tuple[Buffer, ...],
        origin: str,
        since: float,
        attempts: int = 1,
    ) -> None:
        """Keep frames sent upstream; ``attempts``: how often these messages were sent."""
        size = sum(map(len, frames))
        self.entries.append(Entry(last_tag, count, frames, size, origin, since, attempts))
        self.size += size
        self.count += count
        self.totals.add(size, count)

    def confirmed_through(self, tag: int) -> None:
        """The broker has every publish up to ``tag``: forget the entries it covers."""
        entries = self.entries
        while entries and entries[0].last_tag <= tag:
            self._forget(entries.popleft())

    def take(self) -> list[Entry]:
        """Everything, in order; the outbox is empty afterwards."""
        entries = list(self.entries)
        self.entries.clear()
        for entry in entries:
            self._account(entry)
        return entries

    def oldest(self) -> float | None:
        return self.entries[0].since if self.entries else None

    def _forget(self, entry: Entry) -> None:
        self._account(entry)

    def _account(self, entry: Entry) -> None:
        self.size -= entry.size
        self.count -= entry.count
        self.totals.remove(entry.size, entry.count)


def unconfirmed(entries: list[Entry], confirmed: int, ahead: set[int]) -> list[tuple[int, Message]]:
    """The messages of ``entries`` the broker has not confirmed, with their tags."""
    return [
        (tag, message)
        for entry in entries
        for tag, message in entry.messages()
        if tag > confirmed and tag not in ahead
    ]


def refused_index(messages: list[tuple[int, Message]], reply_text: str) -> int:
    """Which unconfirmed message a channel error for a Basic.Publish refers to.

    The broker handles a channel's publishes in order, so the refused one is the first whose
    exchange the error names (RabbitMQ names it for 404 and 403), else the first unconfirmed.
    """
    found = _EXCHANGE_IN_TEXT.search(reply_text)
    if found is not None:
        for index, (_tag, message) in enumerate(messages):
            if message.exchange == found.group(1):
                return index
    return 0
