"""Credentials from a client's Connection.StartOk (PLAIN and AMQPLAIN), kept as bytes.

The broker compares the bytes a client sends; so does the proxy. A user name or password is
never decoded (a replacement character would turn two different passwords into one), and a
response the broker would refuse as malformed is refused here too, with the same rules:
RabbitMQ's PLAIN takes exactly ``NUL user NUL password`` (no authorization identity, no NUL
inside either field), its AMQPLAIN a table whose LOGIN and PASSWORD are long strings.
"""

from __future__ import annotations

from typing import NamedTuple

from amqproxy.amqp import constants as c
from amqproxy.amqp.frames import FrameError
from amqproxy.amqp.table import LONG_STRING, TableError, encode_long_strings, items, long_string

MECHANISMS = "PLAIN AMQPLAIN"


class Credentials(NamedTuple):
    user: bytes
    password: bytes

    def login(self, mechanism: str = "PLAIN") -> tuple[str, bytes]:
        """(mechanism, response) that presents exactly these bytes to the broker: the one
        asked for (a client's own, so the broker's answer reads as for that client), but
        AMQPLAIN when a NUL inside a field needs its length-prefixed strings."""
        if mechanism == "AMQPLAIN" or b"\x00" in self.user or b"\x00" in self.password:
            table = encode_long_strings({b"LOGIN": self.user, b"PASSWORD": self.password})
            return "AMQPLAIN", table
        return "PLAIN", b"\x00" + self.user + b"\x00" + self.password


def _refused(what: str) -> FrameError:
    return FrameError(c.ACCESS_REFUSED, f"ACCESS_REFUSED - {what}")


def credentials(mechanism: str, response: bytes) -> Credentials:
    """The client's credentials; FrameError 403 when the broker would refuse the response."""
    if mechanism == "PLAIN":
        parts = response.split(b"\x00")
        if len(parts) != 3 or parts[0]:
            raise _refused("PLAIN response must be NUL user NUL password")
        return Credentials(parts[1], parts[2])
    if mechanism == "AMQPLAIN":
        found: dict[bytes, bytes] = {}
        try:
            for name, kind, value in items(response):
                if name in (b"LOGIN", b"PASSWORD") and kind == LONG_STRING:
                    found.setdefault(name, long_string(value))
        except TableError:
            raise _refused("malformed AMQPLAIN response") from None
        if b"LOGIN" not in found or b"PASSWORD" not in found:
            raise _refused("AMQPLAIN without LOGIN/PASSWORD")
        return Credentials(found[b"LOGIN"], found[b"PASSWORD"])
    raise _refused(f"unsupported authentication mechanism {mechanism!r}")


def display(value: bytes) -> str:
    """A name for logs, metrics and reply texts (never for authentication)."""
    return value.decode("utf-8", "replace")
