"""A seeded fuzzer: malformed input at six stages of a connection, one case at a time, while a
witness client on the same credentials — riding the same upstream connection — publishes with
confirms after every case. Whatever a client sends, the others are not affected: the upstream
connection is never torn down, the proxy logs no traceback, and its memory comes back.

    AMQPROXY_FUZZ_CASES=2000 python3 -m pytest tests/robustness/test_fuzz.py -q   # the full run
CI runs 200 cases (seed 1); AMQPROXY_FUZZ_SEED picks another seed.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable

import pytest
from pamqp import body as pbody
from pamqp import commands
from pamqp import frame as pframe
from pamqp import header as pheader
from support import UPSTREAM_CONNECTS, queue_counts, wait_for

CASES = int(os.environ.get("AMQPROXY_FUZZ_CASES", "200"))
SEED = int(os.environ.get("AMQPROXY_FUZZ_SEED", "1"))
HEADER = b"AMQP\x00\x00\x09\x01"
STAGES = ("before-header", "after-header", "after-start-ok", "after-tune-ok", "after-open",
          "open-channel")  # fmt: skip


def frame(ftype: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + b"\xce"


def method(channel: int, value: object) -> bytes:
    return pframe.marshal(value, channel)  # type: ignore[arg-type]


def table(entries: bytes) -> bytes:
    return struct.pack(">I", len(entries)) + entries


def deep_table(depth: int) -> bytes:
    inner = b""
    for _ in range(depth):
        inner = b"\x01kF" + table(inner)
    return inner


def wide_table(size: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < size:
        out += b"\x06k%05d" % i + b"S" + table(b"v" * 50)
        i += 1
    return bytes(out)


def start_ok(properties: bytes = b"", response: bytes = b"") -> bytes:
    payload = struct.pack(">HH", 10, 11) + table(properties) + b"\x05PLAIN"
    return frame(1, 0, payload + table(response) + b"\x05en_US")


VALID = [  # method frames of every kind, some of them the server's
    commands.Channel.Flow(active=False),
    commands.Channel.Close(200, "bye", 0, 0),
    commands.Exchange.Declare(exchange="fz-e", exchange_type="fanout", arguments={"a": 1}),
    commands.Exchange.Bind(destination="a", source="b", routing_key="k"),
    commands.Queue.Declare(queue="", exclusive=True, arguments={"x-max-length": 3}),
    commands.Queue.Bind(queue="q", exchange="amq.fanout", routing_key="k"),
    commands.Queue.Purge(queue="fz-missing"),
    commands.Basic.Qos(prefetch_count=3),
    commands.Basic.Consume(queue="fz-missing", arguments={"x-priority": 1}),
    commands.Basic.Cancel(consumer_tag="fz"),
    commands.Basic.Publish(exchange="", routing_key="fz-q"),
    commands.Basic.Get(queue="fz-missing", no_ack=True),
    commands.Basic.Ack(delivery_tag=3),
    commands.Basic.Reject(delivery_tag=1),
    commands.Basic.Nack(delivery_tag=2),
    commands.Basic.Recover(requeue=True),
    commands.Confirm.Select(),
    commands.Tx.Select(),
    commands.Tx.Commit(),
    commands.Connection.Close(200, "x", 0, 0),
    commands.Connection.Open("/"),
    commands.Connection.TuneOk(10, 131072, 0),
    commands.Channel.Open(),
    commands.Channel.OpenOk(),
    commands.Basic.Deliver(consumer_tag="c", delivery_tag=1, routing_key="k"),
    commands.Basic.GetOk(delivery_tag=1, routing_key="k", message_count=0),
    commands.Queue.DeclareOk(queue="q", message_count=0, consumer_count=0),
]


class Generator:
    """Malformed input of every class, from one seeded random stream."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def case(self, stage: str) -> tuple[str, bytes]:
        kinds: list[tuple[str, Callable[[], bytes]]] = [
            ("random-bytes", lambda: self.rng.randbytes(self.rng.randrange(1, 200))),
            ("bad-frame-end", self.bad_end),
            ("huge-size", lambda: struct.pack(">BHI", 1, self.channel(), 0x7FFFFFF0) + b"xy"),
            ("unknown-frame-type", self.unknown_type),
            ("truncated-frame", lambda: self.valid_method()[: self.rng.randrange(1, 12)]),
            ("misplaced-method", self.valid_method),
            ("mutated-method", self.mutated_method),
            ("content-without-method", self.content),
            ("huge-table", self.huge_table),
            ("deep-table", self.deep_table),
            ("publish-bad-header", self.publish_bad_header),
        ]
        if stage == "before-header":
            kinds.append(("wrong-header", lambda: b"AMQP" + self.rng.randbytes(4)))
        if stage == "after-header":
            kinds.append(("start-ok-deep-properties", lambda: start_ok(deep_table(300))))
            kinds.append(("start-ok-huge-properties", lambda: start_ok(wide_table(60000))))
        name, make = self.rng.choice(kinds)
        return name, make()

    def channel(self) -> int:
        return self.rng.choice([0, 1, 1, 1, 2, 65535])

    def valid_method(self) -> bytes:
        return method(self.channel(), self.rng.choice(VALID))

    def bad_end(self) -> bytes:
        data = bytearray(self.valid_method())
        data[-1] = self.rng.choice([0, 0xCD, 0xFF])
        return bytes(data)

    def unknown_type(self) -> bytes:
        ftype = self.rng.choice([0, 4, 5, 7, 9, 100, 255])
        return frame(ftype, self.channel(), self.rng.randbytes(self.rng.randrange(0, 20)))

    def mutated_method(self) -> bytes:
        value = self.rng.choice(VALID)
        payload = bytearray(pframe.marshal(value, 1)[7:-1])
        how = self.rng.randrange(5)
        if how == 0 and len(payload) > 4:  # cut the arguments anywhere
            payload = payload[: self.rng.randrange(4, len(payload))]
        elif how == 1:  # bytes too many
            payload += self.rng.randbytes(self.rng.randrange(1, 6))
        elif how == 2 and len(payload) > 4:  # a flipped argument byte
            payload[self.rng.randrange(4, len(payload))] ^= 1 << self.rng.randrange(8)
        elif how == 3:  # any class and method id
            payload[:4] = self.rng.randbytes(4)
        else:  # a length field made huge
            payload += b"\xff\xff\xff\xff"
        return frame(1, self.channel(), bytes(payload))

    def content(self) -> bytes:
        header = pheader.ContentHeader(0, 3, commands.Basic.Properties())
        parts = [pframe.marshal(header, 1), pframe.marshal(pbody.ContentBody(b"abc"), 1)]
        return self.rng.choice(parts)

    def huge_table(self) -> bytes:
        args = wide_table(self.rng.choice([20000, 100000]))
        payload = struct.pack(">HHH", 50, 10, 0) + b"\x00" + b"\x00" + table(args)
        return frame(1, 1, payload)

    def deep_table(self) -> bytes:
        args = deep_table(self.rng.choice([40, 500, 5000]))
        payload = struct.pack(">HHH", 40, 10, 0) + b"\x04fz-e\x06fanout" + b"\x08" + table(args)
        return frame(1, 1, payload)

    def publish_bad_header(self) -> bytes:
        publish = method(1, commands.Basic.Publish(exchange="", routing_key="fz-q"))
        props = self.rng.choice(
            [
                b"\x80\x00",  # content type announced, missing
                b"\x20\x00" + table(deep_table(500)),  # headers nested too deep
                b"\x20\x00" + table(b"\x01kZ"),  # a field type nobody knows
                b"\x00\x00" + self.rng.randbytes(5),  # bytes left over
                b"\x20\x00" + table(wide_table(60000)),  # large, but valid: passes
            ]
        )
        header = struct.pack(">HHQ", 60, 0, 3) + props
        return publish + frame(2, 1, header) + frame(3, 1, b"abc")


def advance(sock: socket.socket, stage: str, tenant) -> None:  # type: ignore[no-untyped-def]
    """Take a fresh connection to ``stage`` with valid frames."""
    steps = STAGES.index(stage)
    if steps >= 1:
        sock.sendall(HEADER)
        read_frame(sock)  # Connection.Start
    if steps >= 2:
        response = b"\x00" + tenant.user.encode() + b"\x00" + tenant.password.encode()
        sock.sendall(start_ok(b"", response))
        read_frame(sock)  # Tune
    if steps >= 3:
        sock.sendall(method(0, commands.Connection.TuneOk(16, 131072, 0)))
    if steps >= 4:
        sock.sendall(method(0, commands.Connection.Open(tenant.vhost)))
        read_frame(sock)  # OpenOk
    if steps >= 5:
        sock.sendall(method(1, commands.Channel.Open()))
        read_frame(sock)  # OpenOk


def read_frame(sock: socket.socket, timeout: float = 5.0) -> tuple[int, int, bytes]:
    sock.settimeout(timeout)
    head = _read(sock, 7)
    ftype, channel, size = struct.unpack(">BHI", head)
    rest = _read(sock, size + 1)
    return ftype, channel, rest[:-1]


def _read(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def outcome(sock: socket.socket, wait: float = 0.25) -> str:
    """How the proxy answered: 'close <code>', 'closed', 'header' or 'waiting'."""
    deadline = time.monotonic() + wait
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "waiting"
            sock.settimeout(left)
            first = sock.recv(1, socket.MSG_PEEK)
            if not first:
                return "closed"
            if first == b"A":
                return "header"
            ftype, channel, payload = read_frame(sock, left + 1)
            if ftype == 1 and channel == 0 and payload[:4] == b"\x00\x0a\x00\x32":
                return f"close {struct.unpack('>H', payload[4:6])[0]}"
    except TimeoutError:
        return "waiting"
    except OSError:
        return "closed"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


@pytest.mark.timeout(CASES * 2 + 120)
def test_no_input_affects_another_client(proxy_factory, tenant, queues):
    # --no-split-consumers: a case that consumes would otherwise move to a consume connection
    # of its own, and what it sends next would no longer share the witness's upstream.
    p = proxy_factory(
        "-t", "600", "--handshake-timeout", "3", "--credential-ttl", "3600",
        "--no-split-consumers",
    )  # fmt: skip
    q = queues.declare(tenant)
    witness = p.connect(tenant)
    channel = witness.channel()
    channel.confirm_delivery()  # a publish raises unless the broker confirms it
    channel.basic_publish("", q, b"warm-up")
    assert p.proc is not None
    baseline = rss_kib(p.proc.pid)
    rng = random.Random(SEED)
    gen = Generator(rng)
    seen: Counter[str] = Counter()
    for i in range(CASES):
        stage = rng.choice(STAGES)
        name, data = gen.case(stage)
        sock = socket.create_connection((p.host, p.port), timeout=5)
        try:
            advance(sock, stage, tenant)
            sock.sendall(data)
            result = outcome(sock)
        except OSError:
            result = "closed"
        finally:
            sock.close()
        seen[f"{stage} {name} -> {result.split()[0]}"] += 1
        try:
            channel.basic_publish("", q, b"witness %d" % i)
        except Exception as exc:
            pytest.fail(
                f"case {i} (seed {SEED}) broke the witness: {stage} {name} "
                f"{data[:200].hex()} -> {result}: {exc!r}"
            )
    witness.close()
    wait_for(lambda: queue_counts(tenant, q)[0] == CASES + 1, 10)
    assert p.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1, "the shared upstream was torn down"
    log = p.log()
    assert "WARNING amqproxy.upstream" not in log, "an upstream connection was lost"
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    wait_for(
        lambda: rss_kib(p.proc.pid) < baseline + 50 * 1024,
        10,
        message=lambda: f"RSS {rss_kib(p.proc.pid)} KiB, baseline {baseline} KiB",
    )
    print(f"{CASES} cases (seed {SEED}); RSS {baseline} -> {rss_kib(p.proc.pid)} KiB")
    for line, n in sorted(seen.items()):
        print(f"  {n:4d}  {line}")
