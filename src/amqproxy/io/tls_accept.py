"""The TLS port: accept, run each client's TLS handshake within its timeout, then hand the
connection to a client protocol.

``create_server(ssl=...)`` would drop a client whose handshake fails (no certificate, one from
another CA, not TLS at all, silent) without a word. Here each accepted socket goes through
``loop.connect_accepted_socket(ssl=...)``, which raises when the handshake fails, so that every
failure is one log line with the client's address and the reason. The client protocol sees
``connection_made`` only once the handshake is done, with the TLS transport (its peer's
certificate in ``get_extra_info("peercert")``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

from amqproxy.io.sockets import Address, bound_socket
from amqproxy.tls import describe

log = logging.getLogger("amqproxy.client")


class TlsListener:
    """The listening sockets of the TLS port and their accept loops."""

    def __init__(
        self,
        client: Callable[[], asyncio.Protocol],
        context: Callable[[], ssl.SSLContext],
        timeout: float,
        reuse_port: bool = False,
    ) -> None:
        self.client = client
        self.reuse_port = reuse_port  # a worker of several: the port is shared
        self.context = context  # read at each accept: a new certificate applies to the next
        self.timeout = timeout
        self.sockets: list[socket.socket] = []
        self._loops: list[asyncio.Task[None]] = []
        self._handshakes: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, backlog: int = 1024) -> None:
        """Bind every address ``host`` resolves to (as create_server does); OSError if one
        cannot be bound."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        try:
            for family, kind, proto, _name, address in dict.fromkeys(infos):
                sock = _bind(family, kind, proto, address, backlog, self.reuse_port)
                self.sockets.append(sock)
        except OSError:
            self.close()
            raise
        self._loops = [
            loop.create_task(self._accept(sock), name="tls accept") for sock in self.sockets
        ]

    def close(self) -> None:
        """Stop accepting (handshakes under way finish or time out on their own). An accept
        loop closes its socket itself once it is out of ``sock_accept``."""
        if self._loops:
            for task in self._loops:
                task.cancel()
        else:
            for sock in self.sockets:
                sock.close()
        self._loops = []

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    sock, address = await loop.sock_accept(listener)
                except OSError as exc:  # out of file descriptors, a reset before accept
                    log.warning("TLS port: accept failed: %s", exc)
                    await asyncio.sleep(0.1)
                    continue
                peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else "?"
                task = loop.create_task(self._handshake(sock, peer), name="tls handshake")
                self._handshakes.add(task)
                task.add_done_callback(self._handshake_done)
        finally:
            listener.close()

    async def _handshake(self, sock: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                self.client, sock, ssl=self.context(), ssl_handshake_timeout=self.timeout
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError and ConnectionError are OSErrors
            # the transport owns the socket and closes it (uvloop detaches it then: a close
            # of ours could hit a descriptor already reused)
            log.info("client %s: TLS handshake failed: %s", peer, _reason(exc))

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        self._handshakes.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:  # a bug, not the client: say so once, without a traceback
            log.error("TLS port: handshake task failed: %r", exc)


def _bind(
    family: socket.AddressFamily,
    kind: socket.SocketKind,
    proto: int,
    address: Address,
    backlog: int,
    reuse_port: bool = False,
) -> socket.socket:
    try:
        sock = bound_socket(family, kind, proto, address, reuse_port)
    except OSError as exc:
        where = ":".join(str(part) for part in address[:2])
        raise OSError(f"TLS port: cannot bind {where}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) or "taking longer than" in str(exc):
        return "no handshake within the handshake timeout"
    if isinstance(exc, ConnectionResetError | BrokenPipeError) or not str(exc):
        return "the client closed the connection"
    if getattr(exc, "reason", None) in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST"):
        return f"not TLS ({describe(exc)}): a plain AMQP client on the TLS port?"
    return describe(exc)
