"""Credentials from a client's Connection.StartOk (PLAIN and AMQPLAIN)."""

from __future__ import annotations

import struct

from pamqp import decode

from amqproxy.amqp import constants as c
from amqproxy.amqp.frames import FrameError

MECHANISMS = "PLAIN AMQPLAIN"


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def credentials(mechanism: str, response: str | bytes) -> tuple[str, str]:
    """(user, password) from a SASL response; FrameError 403 when it cannot be read."""
    raw = _as_bytes(response)
    if mechanism == "PLAIN":
        parts = raw.split(b"\x00")
        if len(parts) != 3:
            raise FrameError(c.ACCESS_REFUSED, "ACCESS_REFUSED - malformed PLAIN response")
        return parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace")
    if mechanism == "AMQPLAIN":
        # A field table without its length prefix.
        try:
            _, table = decode.field_table(struct.pack(">I", len(raw)) + raw)
        except Exception:
            raise FrameError(
                c.ACCESS_REFUSED, "ACCESS_REFUSED - malformed AMQPLAIN response"
            ) from None
        user, password = table.get("LOGIN"), table.get("PASSWORD")
        if not isinstance(user, str | bytes) or not isinstance(password, str | bytes):
            raise FrameError(c.ACCESS_REFUSED, "ACCESS_REFUSED - AMQPLAIN without LOGIN/PASSWORD")
        return _as_bytes(user).decode("utf-8", "replace"), _as_bytes(password).decode(
            "utf-8", "replace"
        )
    raise FrameError(
        c.ACCESS_REFUSED, f"ACCESS_REFUSED - unsupported authentication mechanism {mechanism!r}"
    )


def plain_response(user: str, password: str) -> str:
    """The PLAIN response the proxy sends upstream."""
    return f"\x00{user}\x00{password}"
