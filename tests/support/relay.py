"""A fault-injecting TCP relay between the proxy and a broker, in its own thread."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any

from support.util import BROKER_HOST, BROKER_PORT


# ---------------------------------------------------------------------------------------------
# fault relay
# ---------------------------------------------------------------------------------------------
class _RelaySide(asyncio.Protocol):
    def __init__(self, relay: FaultRelay, pair: _RelayPair, name: str) -> None:
        self.relay = relay
        self.pair = pair
        self.name = name
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.name == "down":
            self.pair.on_downstream(self)

    def data_received(self, data: bytes) -> None:
        self.pair.forward(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pair.frozen and self.name == "up":
            return  # a frozen network: the proxy side must notice the silence by itself
        self.pair.close()


class _RelayPair:
    def __init__(self, relay: FaultRelay) -> None:
        self.relay = relay
        self.down: _RelaySide | None = None
        self.up: _RelaySide | None = None
        self.pending: list[bytes] = []
        self.held: list[bytes] = []  # broker -> proxy data held back by hold_replies()
        self.frozen = False
        self.closed = False

    def on_downstream(self, side: _RelaySide) -> None:
        self.down = side
        self.relay._pairs[self] = None
        self.relay.accepted_total += 1
        mode = self.relay.mode
        if mode == "refuse":
            self.close()
            return
        if mode == "blackhole":
            return
        asyncio.get_running_loop().create_task(self._connect_up())

    async def _connect_up(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(
                lambda: _RelaySide(self.relay, self, "up"), *self.relay.target
            )
        except OSError:
            self.close()
            return
        if self.closed:
            up.transport and up.transport.abort()  # type: ignore[func-returns-value]
            return
        self.up = up  # type: ignore[assignment]
        for chunk in self.pending:
            up.transport.write(chunk)  # type: ignore[union-attr]
        self.pending.clear()

    def forward(self, src: _RelaySide, data: bytes) -> None:
        if self.relay.mode == "freeze":
            self.frozen = True  # a dead path stays dead: TCP never resumes after lost bytes
        if self.closed or self.frozen:
            return
        if self.relay.delay and not self.relay.replies_held:
            # a slow link: each chunk leaves `delay` seconds after it came, in order
            loop = asyncio.get_running_loop()
            loop.call_later(self.relay.delay, self._pass, src, data)
            return
        self._pass(src, data)

    def _pass(self, src: _RelaySide, data: bytes) -> None:
        if self.closed:
            return
        if src is self.down:
            if self.relay.mode == "blackhole":
                return
            if self.up is None or self.up.transport is None:
                self.pending.append(data)
            else:
                self.up.transport.write(data)
        elif self.relay.replies_held:
            self.held.append(data)
        elif self.down is not None and self.down.transport is not None:
            self.down.transport.write(data)

    def release(self) -> None:
        held, self.held = self.held, []
        if self.down is not None and self.down.transport is not None and not self.closed:
            for chunk in held:
                self.down.transport.write(chunk)

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.relay._pairs.pop(self, None)
        for side in (self.down, self.up):
            if side is not None and side.transport is not None:
                if abort:
                    side.transport.abort()
                else:
                    side.transport.close()


class FaultRelay:
    """TCP relay 127.0.0.1:<port> -> target, in its own thread.

    mode: "forward" (default), "blackhole" (accept, never answer; drops client->broker data of
    open connections too), "refuse" (accept and close), "freeze" (open connections go silent in
    both directions for good and the broker's closing is not passed on: a dead network path;
    connections made after the mode changes back work).
    ``cut()`` closes every relayed connection at once (both legs). ``hold_replies()`` keeps
    what the broker sends from reaching the proxy until ``release_replies()`` (in order): the
    way to make a race between a broker reply and a client's next step happen on purpose.
    ``delay``: seconds every chunk waits in each direction (a slow link).
    """

    def __init__(self, target: tuple[str, int] = (BROKER_HOST, BROKER_PORT)) -> None:
        self.target = target
        self._mode = "forward"
        self.replies_held = False
        self.delay = 0.0  # seconds each chunk waits, both ways (a slow link)
        self.accepted_total = 0
        self._pairs: dict[_RelayPair, None] = {}  # insertion (accept) order
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="fault-relay", daemon=True
        )
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    def start(self) -> FaultRelay:
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
        fut.result(timeout=5)
        return self

    async def _serve(self) -> None:
        def factory() -> _RelaySide:
            return _RelaySide(self, _RelayPair(self), "down")

        self.server = await self.loop.create_server(factory, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"amqp://127.0.0.1:{self.port}"

    def _call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=5)

    @property
    def connections(self) -> int:
        return int(self._call(lambda: len(self._pairs)))

    def cut(self, abort: bool = True, only: int | None = None) -> int:
        """Close every relayed connection now (abort=True: TCP RST), or only the ``only``-th
        of the currently open ones in accept order. Returns how many were closed."""

        def do() -> int:
            pairs = list(self._pairs)
            if only is not None:
                pairs = pairs[only : only + 1]
            for p in pairs:
                p.close(abort=abort)
            return len(pairs)

        return int(self._call(do))

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self._mode = mode
        if mode == "freeze" and self.thread.is_alive():

            def freeze_all() -> None:
                for p in self._pairs:
                    p.frozen = True

            self._call(freeze_all)

    def hold_replies(self) -> None:
        self._call(lambda: setattr(self, "replies_held", True))

    def release_replies(self) -> None:
        def do() -> None:
            self.replies_held = False
            for p in list(self._pairs):
                p.release()

        self._call(do)

    def close(self) -> None:
        def do() -> None:
            for p in list(self._pairs):
                p.close(abort=True)
            if self.server is not None:
                self.server.close()

        with contextlib.suppress(Exception):
            self._call(do)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
