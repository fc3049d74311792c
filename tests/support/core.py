"""Drive the I/O-free sessions (amqproxy.core) with bytes, without sockets or a broker.

``Rig`` wires one pool with one upstream connection to any number of clients. Each side's host
records what the session asked for: bytes written, closes, held reads, round trips. The tests
play both peers: they feed a client's bytes into its session and the broker's bytes into the
upstream session, and read the frames each peer got.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from typing import Any

from pamqp import body as pbody
from pamqp import commands
from pamqp import frame as pframe
from pamqp import header as pheader

from amqproxy.amqp.auth import Credentials
from amqproxy.amqp.frames import Buffer
from amqproxy.channel import Lease, UpstreamChannel
from amqproxy.config import Settings, load
from amqproxy.core.client import ClientSession
from amqproxy.core.upstream import UpstreamSession
from amqproxy.pool import Pool, PoolRegistry
from amqproxy.roles import CONSUME
from amqproxy.stats import PoolStats

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_MAX = 131072
USER, PASSWORD, VHOST = b"guest", b"guest", b"/"


def method(channel: int, value: Any) -> bytes:
    return pframe.marshal(value, channel)


def message(
    channel: int, body: bytes, exchange: str = "", frame_max: int = FRAME_MAX, **flags: Any
) -> bytes:
    """Basic.Publish, its content header and one body frame per ``frame_max - 8`` bytes."""
    out = method(channel, commands.Basic.Publish(exchange=exchange, routing_key="q", **flags))
    out += content(channel, body, frame_max)
    return out


def content(channel: int, body: bytes, frame_max: int = FRAME_MAX) -> bytes:
    """A content header and the body frames of ``body``."""
    out = pframe.marshal(pheader.ContentHeader(0, len(body), commands.Basic.Properties()), channel)
    for start in range(0, len(body), frame_max - 8):
        out += pframe.marshal(pbody.ContentBody(body[start : start + frame_max - 8]), channel)
    return out


def frames_of(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, channel, payload) of every whole frame in ``data`` (which must end on one)."""
    out, pos = [], 0
    while pos < len(data):
        ftype, channel, size = struct.unpack_from(">BHI", data, pos)
        assert data[pos + 7 + size] == 0xCE, "bad frame end"
        out.append((ftype, channel, data[pos + 7 : pos + 7 + size]))
        pos += 8 + size
    assert pos == len(data), "a partial frame"
    return out


def methods_of(data: bytes) -> list[tuple[int, Any]]:
    """(channel, pamqp method) of every method frame in ``data``."""
    out = []
    for ftype, channel, payload in frames_of(data):
        if ftype == 1:
            out.append((channel, pframe.unmarshal(struct.pack(">BHI", 1, channel, len(payload))
                                                   + payload + b"\xce")[2]))  # fmt: skip
    return out


class ClientPeer:
    """A client socket, as its session sees it (``core.host.ClientHost``)."""

    def __init__(self, rig: Rig, name: str) -> None:
        self.rig = rig
        self.peer = name
        self.out = bytearray()  # everything the proxy wrote to this client
        self.closed = self.aborted = False
        self.held: set[str] = set()
        self.opening: list[tuple[Pool, Lease, bool]] = []  # open_channel round trips asked for
        self.moves: list[tuple[Lease, Any]] = []  # ... those for a consume connection, and near
        self.heartbeat = 0
        self.session = ClientSession(self, rig.settings, rig.registry, rig)

    # ---- ClientHost ----
    def now(self) -> float:
        return self.rig.loop.time()

    def write(self, data: bytes) -> None:
        self.out += data

    def deliver(self, pieces: list[Buffer]) -> None:
        self.out += b"".join(pieces)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def close_after(self, seconds: float) -> None:
        pass

    def hold(self, reason: str) -> None:
        self.held.add(reason)

    def release(self, reason: str) -> None:
        self.held.discard(reason)

    def start_heartbeat(self, seconds: int) -> None:
        self.heartbeat = seconds

    def credit_traffic(self, stats: PoolStats) -> None:
        pass  # the rig counts no bytes

    def learn_broker(self) -> None:
        self.session.send_start(self.rig.start_frame())

    def check_credentials(self, credentials: Credentials, mechanism: str) -> None:
        self.session.credentials_checked(None)

    def authenticate(self, pool: Pool, login: Any) -> None:
        self.session.admitted(pool)

    def open_channel(
        self, pool: Pool, lease: Lease, confirm: bool, consume: bool = False, near: Any = None
    ) -> None:
        self.opening.append((pool, lease, confirm))
        if consume:
            self.moves.append((lease, near))

    def update_secret(self, pool: Pool, credentials: Credentials, reason: str) -> None:
        self.session.secret_updated(pool, credentials, reason)

    # ---- the test's side ----
    def send(self, data: bytes) -> None:
        self.session.receive(data)

    def take(self) -> bytes:
        out, self.out = bytes(self.out), bytearray()
        return out

    def connect(self, frame_max: int = FRAME_MAX) -> None:
        """The handshake, up to OpenOk (the pool is trusted: no round trip)."""
        response = f"\0{USER.decode()}\0{PASSWORD.decode()}"
        self.send(PROTOCOL_HEADER)
        start_ok = commands.Connection.StartOk(mechanism="PLAIN", response=response)
        self.send(method(0, start_ok))
        self.send(method(0, commands.Connection.TuneOk(0, frame_max, 0)))
        self.send(method(0, commands.Connection.Open(virtual_host=VHOST.decode())))
        replies = [type(m).__name__ for _, m in methods_of(self.take())]
        assert replies == ["Start", "Tune", "OpenOk"], replies


@dataclass
class BrokerPeer:
    """The upstream socket, as its session sees it (``core.host.UpstreamHost``)."""

    out: bytearray = field(default_factory=bytearray)  # everything the proxy sent the broker
    session: UpstreamSession | None = None
    closed: bool = False

    def queue(self, pieces: list[Buffer]) -> None:
        self.out += b"".join(pieces)  # (the proxy's write at the end of the turn)

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def start_heartbeat(self, seconds: int) -> None:
        pass

    def abort_after(self, seconds: float) -> None:
        pass

    def send(self, data: bytes) -> None:
        assert self.session is not None
        self.session.receive(data)

    def take(self) -> bytes:
        out, self.out = bytes(self.out), bytearray()
        return out


class Rig:
    """One pool, its upstream connection, and the clients the test adds. The split of
    consumers from publishers is off unless a test asks for it (``split_consumers=True``)
    and adds a consume connection (``consume_upstream``)."""

    def __init__(self, **settings: Any) -> None:
        self.loop = asyncio.get_running_loop()
        settings.setdefault("split_consumers", False)
        overrides = {key: str(value) for key, value in settings.items()}
        self.settings: Settings = load(None, {"AMQP_URL": "amqp://broker"}, overrides)
        self.registry = PoolRegistry(self.settings, self._connect)
        self.pool = self.registry.pool(Credentials(USER, PASSWORD), VHOST)
        self.broker = BrokerPeer()
        self.upstream = self._open_upstream(self.broker)

    async def _connect(self, pool: Pool) -> UpstreamSession:
        raise AssertionError("the rig's pool has its upstream already")

    def consume_upstream(self) -> tuple[UpstreamSession, BrokerPeer]:
        """A second upstream connection of the pool, in the consume role."""
        broker = BrokerPeer()
        session = self._open_upstream(broker, serial=2)
        session.role = CONSUME
        return session, broker

    def _open_upstream(self, broker: BrokerPeer, serial: int = 1) -> UpstreamSession:
        session = UpstreamSession(self.pool, serial, self.settings, self.loop.time)
        broker.session = session
        session.connected(broker, "127.0.0.1:1")
        start = commands.Connection.Start(server_properties={"product": "RabbitMQ"})
        broker.send(method(0, start))
        broker.send(method(0, commands.Connection.Tune(2047, FRAME_MAX, 0)))
        broker.send(method(0, commands.Connection.OpenOk()))
        assert session.open
        broker.take()
        self.pool.upstreams.append(session)
        self.pool.verified_at = self.loop.time()
        return session

    # ---- core.host.BrokerFacts ----
    def start_frame(self) -> bytes:
        return method(0, commands.Connection.Start(server_properties={"product": "RabbitMQ"}))

    def tune_frame(self, frame_max: int) -> bytes:
        return method(0, commands.Connection.Tune(2047, frame_max, 0))

    # ---- the test's side ----
    def client(self, name: str = "client", frame_max: int = FRAME_MAX) -> ClientPeer:
        peer = ClientPeer(self, name)
        peer.connect(frame_max)
        return peer

    def channel(self, upstream_id: int) -> UpstreamChannel:
        return self.upstream.channels[upstream_id]
