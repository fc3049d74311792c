"""What was worked out for the byte strings seen last, by their bytes.

Short-lived clients of one library send the same bytes every time (the StartOk properties
table, a Channel.Close): what a check or a decode said about them is kept for the next client
that sends them. Bounded in entries and in the size of what is kept; the oldest goes first.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from amqproxy.amqp.frames import Buffer

V = TypeVar("V")


class Recent(Generic[V]):
    """At most ``entries`` values, each for a key of at most ``max_size`` bytes."""

    __slots__ = ("_values", "entries", "max_size")

    def __init__(self, entries: int, max_size: int) -> None:
        self.entries = entries
        self.max_size = max_size
        self._values: dict[Buffer, V] = {}  # keys: bytes; looked up with a read-only view too

    def get(self, key: Buffer) -> V | None:
        """The value kept for these bytes (``key``: bytes, or a read-only view of them)."""
        return self._values.get(key)

    def keep(self, key: Buffer, value: V) -> None:
        """Keep ``value`` for a copy of ``key``, unless the key is over the size bound."""
        if len(key) > self.max_size:
            return
        values = self._values
        if len(values) >= self.entries:
            del values[next(iter(values))]  # the oldest
        values[bytes(key)] = value

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: Buffer) -> bool:
        return key in self._values

    def values(self) -> list[V]:
        return list(self._values.values())

    def keys(self) -> list[bytes]:
        return [bytes(key) for key in self._values]
