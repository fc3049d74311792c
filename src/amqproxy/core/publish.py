"""Publish assembly: a message goes upstream whole or not at all (docs/ARCHITECTURE.md).

A client's Basic.Publish is followed by a content header and body frames; the proxy forwards
a message only once its last body byte has arrived, so that a client that dies mid-message
leaves nothing half-sent on a shared upstream channel. Both client paths (the fast one that
passes slices of the read buffer and the slow one that rewrites frames) keep the sequence of
one channel here.
"""

from __future__ import annotations

import enum

from amqproxy.amqp import constants as c
from amqproxy.amqp.frames import Buffer, FrameError
from amqproxy.amqp.methods import body_size


class Stage(enum.IntEnum):
    """Where a channel is in a message (false only between messages)."""

    NONE = 0
    HEADER = 1  # Basic.Publish seen, the content header is due
    BODY = 2  # the header seen, body bytes are due


def content_expected() -> FrameError:
    return FrameError(
        c.UNEXPECTED_FRAME,
        "UNEXPECTED_FRAME - expected content header for class 60, "
        "got non content header frame instead",
    )


def header_without_publish(channel: int) -> FrameError:
    return FrameError(
        c.UNEXPECTED_FRAME,
        f"UNEXPECTED_FRAME - content header on channel {channel} without a preceding basic.publish",
    )


def body_without_header(channel: int) -> FrameError:
    return FrameError(
        c.UNEXPECTED_FRAME,
        f"UNEXPECTED_FRAME - content body on channel {channel} without a preceding content header",
    )


def body_too_long() -> FrameError:
    return FrameError(c.FRAME_ERROR, "FRAME_ERROR - content body larger than its header announced")


class Assembly:
    """The message one client channel is sending: its stage and the frames kept so far.

    ``frames`` holds the parts of the message from earlier reads (or rewritten frames);
    ``start`` is where its part in the current read buffer begins, while the frames there
    still lie next to each other.
    """

    __slots__ = ("frames", "remaining", "stage", "start")

    def __init__(self) -> None:
        self.stage = Stage.NONE
        self.remaining = 0  # body bytes still due
        self.frames: list[Buffer] = []
        self.start = 0

    def begin(self, flags: int) -> None:
        """A Basic.Publish (``flags``: its mandatory/immediate bits) was seen."""
        if self.stage:
            raise content_expected()
        if flags & c.PUBLISH_IMMEDIATE:
            raise FrameError(c.NOT_IMPLEMENTED, "NOT_IMPLEMENTED - immediate=true")
        self.stage = Stage.HEADER

    def content(self, ftype: int, data: Buffer, start: int, end: int, channel: int) -> bool:
        """A content frame with payload ``data[start:end]`` on ``channel``: True when it ends
        the message. Out of order or too long: FrameError, as from the broker."""
        if ftype == c.FRAME_HEADER:
            if self.stage != Stage.HEADER:
                raise header_without_publish(channel)
            remaining = body_size(data, start, end)
        else:
            if self.stage != Stage.BODY:
                raise body_without_header(channel)
            remaining = self.remaining - (end - start)
            if remaining < 0:
                raise body_too_long()
        if remaining:
            self.stage = Stage.BODY
            self.remaining = remaining
            return False
        self.stage = Stage.NONE
        return True

    def take(self) -> list[Buffer]:
        """The frames kept for the message (which is complete, or being dropped)."""
        kept, self.frames = self.frames, []
        return kept

    def drop(self) -> None:
        """Forget a message the client did not complete: it never goes upstream."""
        self.frames = []
        self.stage = Stage.NONE
        self.remaining = 0
