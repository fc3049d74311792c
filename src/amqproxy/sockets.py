"""Socket options shared by both legs."""

from __future__ import annotations

import asyncio
import socket


def nodelay(transport: asyncio.BaseTransport) -> socket.socket | None:
    """Set TCP_NODELAY (the proxy already writes once per read; Nagle would only add delay).

    Returns the socket, or None for a transport without one.
    """
    sock: socket.socket | None = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (a Unix socket in tests): nothing to tune
            pass
    return sock
