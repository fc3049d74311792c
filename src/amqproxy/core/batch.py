"""What one read produces for its destinations, written once per destination.

Both hot paths walk a read buffer frame by frame (or run by run) and decide, for each stretch,
where it goes. Consecutive stretches for the same destination that lie next to each other in
the buffer travel as one slice of it; copies and rewritten frames go as they are.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from amqproxy.amqp.frames import Buffer

D = TypeVar("D")  # a destination: hashable (a dict key)


class Batch(Generic[D]):
    """Pieces per destination for one read of ``view``."""

    __slots__ = ("outs", "run_dest", "run_end", "run_start", "view")

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.outs: dict[D, list[Buffer]] = {}
        self.run_dest: D | None = None  # the stretch of the buffer being extended
        self.run_start = 0
        self.run_end = 0

    def begin(self, view: memoryview) -> None:
        """The next read, for a batch its stream keeps from read to read (no allocation per
        read); what a walk cut short by an error left is dropped."""
        self.view = view
        self.run_dest = None
        if self.outs:
            self.outs = {}

    def stretch(self, dest: D, start: int, end: int) -> None:
        """view[start:end] goes to ``dest`` as it is."""
        run_dest = self.run_dest
        if run_dest is dest and self.run_end == start:
            self.run_end = end
            return
        if run_dest is not None:
            self.cut()
        self.run_dest, self.run_start, self.run_end = dest, start, end

    def piece(self, dest: D, piece: Buffer) -> None:
        """A piece of its own (a copy, a rewritten frame) for ``dest``."""
        if self.run_dest is not None:
            self.cut()
        _add(self.outs, dest, [piece])

    def pieces(self, dest: D, pieces: list[Buffer]) -> None:
        if self.run_dest is not None:
            self.cut()
        _add(self.outs, dest, pieces)

    def cut(self) -> None:
        """End the stretch being extended (what comes next goes after it)."""
        if self.run_dest is not None:
            _add(self.outs, self.run_dest, [self.view[self.run_start : self.run_end]])
            self.run_dest = None

    def take(self) -> dict[D, list[Buffer]]:
        """Everything so far, per destination; the batch starts empty again. (The common
        read, one stretch for one destination, costs one call and one small dict.)"""
        outs = self.outs
        dest = self.run_dest
        if dest is not None:
            self.run_dest = None
            stretch = self.view[self.run_start : self.run_end]
            if not outs:
                return {dest: [stretch]}
            _add(outs, dest, [stretch])
        self.outs = {}
        return outs


def _add(outs: dict[D, list[Buffer]], dest: D, pieces: list[Buffer]) -> None:
    """Queue ``pieces`` for ``dest`` (the list may be taken over)."""
    out = outs.get(dest)
    if out is None:
        outs[dest] = pieces
    else:
        out.extend(pieces)
