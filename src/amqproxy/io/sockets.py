"""Listening sockets made the way every listener of the proxy makes them.

The plain port (through asyncio), the TLS port (its own accept loop) and the supervisor's
port check all bind alike: ``SO_REUSEADDR``, ``SO_REUSEPORT`` where workers share a port, and
IPv6 sockets that take IPv6 only (the IPv4 address gets a socket of its own).
"""

from __future__ import annotations

import socket

Address = tuple[str, int] | tuple[str, int, int, int] | tuple[int, bytes]


def bound_socket(
    family: socket.AddressFamily,
    kind: socket.SocketKind,
    proto: int,
    address: Address,
    reuse_port: bool = False,
) -> socket.socket:
    """A socket bound to ``address`` (closed again if binding fails: OSError)."""
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock
