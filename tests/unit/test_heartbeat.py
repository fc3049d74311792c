"""The heartbeat timer of one socket, tick by tick, from the byte counts the socket keeps."""

from __future__ import annotations

from typing import Any

from amqproxy.amqp import frames
from amqproxy.io.heartbeat import Heartbeat


class Loop:
    """Only what the timer uses: ``call_later``; the test runs the ticks itself."""

    def __init__(self) -> None:
        self.due: list[Any] = []

    def call_later(self, delay: float, callback: Any) -> Any:
        self.due.append((delay, callback))
        return self

    def cancel(self) -> None:
        pass

    def tick(self) -> None:
        _delay, callback = self.due.pop(0)
        callback()


class Socket:
    def __init__(self) -> None:
        self.read = self.written = 0
        self.sent: list[bytes] = []
        self.dead = False

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)
        self.written += len(frame)  # the adapter counts its own heartbeats too

    def traffic(self) -> tuple[int, int]:
        return self.read, self.written


def started(seconds: int = 10) -> tuple[Loop, Socket, Heartbeat]:
    loop, sock = Loop(), Socket()
    beat = Heartbeat(loop, sock.send, lambda: setattr(sock, "dead", True), sock.traffic)  # type: ignore[arg-type]
    beat.start(seconds)
    assert loop.due == [(seconds / 2, beat._tick)]
    return loop, sock, beat


def test_an_idle_socket_gets_a_heartbeat_every_half_interval_not_every_other() -> None:
    loop, sock, _ = started()
    for tick in range(1, 4):
        sock.read += 8  # the peer's heartbeats keep it alive
        loop.tick()
        assert sock.sent == [frames.HEARTBEAT] * tick  # our own last heartbeat is no traffic
    assert not sock.dead


def test_no_heartbeat_while_the_socket_writes_and_dead_after_two_intervals_of_silence() -> None:
    loop, sock, _ = started()
    for _ in range(3):
        sock.written += 100  # publishes going out
        loop.tick()
    assert sock.sent == []
    assert not sock.dead
    loop.tick()  # the fourth silent half-interval: 2·H with nothing read
    assert sock.dead
    assert loop.due == []  # no tick after death


def test_anything_read_resets_the_silence() -> None:
    loop, sock, _ = started()
    for _ in range(3):
        loop.tick()
    sock.read += 1
    loop.tick()
    for _ in range(3):
        loop.tick()
    assert not sock.dead
    loop.tick()
    assert sock.dead
