"""Crowds and idlers: a connection storm leaves exactly the messages published and the proxy's
memory and file descriptors where they were; slow or silent sockets are closed within the
handshake timeout while real clients go on being served.

    AMQPROXY_STORM=full python3 -m pytest tests/robustness/test_load.py -q
runs the sizes of the issue (1,000 concurrent, 10,000 sequential); CI runs 1,000 and 3,000.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time

import pytest
from support import ROOT, queue_counts, wait_for

sys.path.insert(0, str(ROOT / "bench"))
import fastamqp

FULL = os.environ.get("AMQPROXY_STORM") == "full"
CONCURRENT = 1000
SEQUENTIAL = 10_000 if FULL else 3000
LOOPS = 20  # sequential cycles are spread over this many loops, each one client at a time


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _concurrent(host: str, port: int, tenant, queue: str, n: int) -> int:  # type: ignore[no-untyped-def]
    """n clients connect, open a channel and publish one message each; all are open at once
    before any closes. Returns how many were open together."""
    conns = await asyncio.gather(
        *(
            fastamqp.connect(host, port, tenant.user, tenant.password, tenant.vhost)
            for _ in range(n)
        )
    )
    for i, conn in enumerate(conns):
        conn.write(fastamqp._cached_prefix(queue) + fastamqp._body_frame(1, fastamqp.body_for(i)))
    await asyncio.gather(*(conn.declare_passive(queue) for conn in conns))  # all published
    await asyncio.gather(*(conn.close() for conn in conns))
    return len(conns)


async def _sequential(host: str, port: int, tenant, queue: str, first: int, n: int) -> None:  # type: ignore[no-untyped-def]
    per_loop = n // LOOPS

    async def loop(k: int) -> None:
        for j in range(per_loop):
            msg_id = first + k * per_loop + j
            await fastamqp.short_cycle(host, port, queue, msg_id, user=tenant.user,
                                       password=tenant.password, vhost=tenant.vhost)  # fmt: skip

    await asyncio.gather(*(loop(k) for k in range(LOOPS)))


@pytest.mark.timeout(300)
def test_storm_leaves_exact_contents_and_flat_memory_and_fds(proxy_factory, tenant, queues):
    p = proxy_factory("-t", "600", "--credential-ttl", "3600")
    q = queues.declare(tenant)
    assert p.proc is not None
    pid = p.proc.pid
    fastamqp.run(_sequential(p.host, p.port, tenant, q, 10**8, LOOPS * 10))  # warm up
    time.sleep(1)
    rss0, fds0 = rss_kib(pid), fds(pid)

    together = fastamqp.run(_concurrent(p.host, p.port, tenant, q, CONCURRENT))
    assert together == CONCURRENT
    wait_for(lambda: fds(pid) <= fds0 + 2, 10, message=lambda: f"fds {fds(pid)} vs {fds0}")

    t0 = time.monotonic()
    fastamqp.run(_sequential(p.host, p.port, tenant, q, 10**6, SEQUENTIAL // 5))
    rss_early = rss_kib(pid)
    fastamqp.run(_sequential(p.host, p.port, tenant, q, 2 * 10**6, SEQUENTIAL - SEQUENTIAL // 5))
    elapsed = time.monotonic() - t0
    wait_for(lambda: fds(pid) <= fds0 + 2, 10, message=lambda: f"fds {fds(pid)} vs {fds0}")
    rss_late = rss_kib(pid)

    expected = set(range(CONCURRENT))
    expected |= {10**8 + i for i in range(LOOPS * 10)}
    expected |= {10**6 + i for i in range(SEQUENTIAL // 5)}
    expected |= {2 * 10**6 + i for i in range(SEQUENTIAL - SEQUENTIAL // 5)}
    wait_for(lambda: queue_counts(tenant, q)[0] == len(expected), 20)
    credentials = {"user": tenant.user, "password": tenant.password, "vhost": tenant.vhost}
    got = fastamqp.run(fastamqp.drain_ids("127.0.0.1", 5672, q, len(expected), **credentials))
    assert sorted(got) == sorted(expected), "lost or duplicated messages"
    assert rss_late - rss_early < 5 * 1024, f"RSS grew {rss_early} -> {rss_late} KiB"
    assert rss_late - rss0 < 30 * 1024, f"RSS {rss0} -> {rss_late} KiB after the crowd left"
    print(
        f"{CONCURRENT} concurrent + {SEQUENTIAL} sequential ({SEQUENTIAL / elapsed:.0f}/s): "
        f"RSS {rss0} -> {rss_early} -> {rss_late} KiB, fds {fds0} -> {fds(pid)}"
    )


@pytest.mark.timeout(120)
def test_slow_and_silent_sockets_are_closed_within_the_handshake_timeout(
    proxy_factory, tenant, queues
):
    """300 sockets that never finish their handshake — silent, half a protocol header, a
    header and then nothing, a StartOk and then nothing — are all closed by the proxy within
    the handshake timeout; meanwhile a real client is served without delay."""
    p = proxy_factory("-t", "600", "--handshake-timeout", "2")
    q = queues.declare(tenant)
    assert p.proc is not None
    fds0 = fds(p.proc.pid)
    starts = [b"", b"AMQ", b"AMQP\x00\x00\x09\x01", b"AMQP\x00\x00\x09\x01\x01\x00\x00"]
    socks = []
    t0 = time.monotonic()
    for i in range(300):
        s = socket.create_connection((p.host, p.port), timeout=5)
        s.sendall(starts[i % len(starts)])
        socks.append(s)
    c = p.connect(tenant)  # a real client meanwhile
    c.channel().basic_publish("", q, b"served")
    c.close()
    served_in = time.monotonic() - t0
    closed_at: dict[int, float] = {}
    deadline = time.monotonic() + 10
    while len(closed_at) < len(socks) and time.monotonic() < deadline:
        for i, s in enumerate(socks):
            if i in closed_at:
                continue
            s.setblocking(False)
            try:
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        closed_at[i] = time.monotonic() - t0
                        break
            except BlockingIOError:
                pass
            except OSError:
                closed_at[i] = time.monotonic() - t0
        time.sleep(0.05)
    for s in socks:
        s.close()
    assert len(closed_at) == len(socks), f"{len(socks) - len(closed_at)} sockets left open"
    assert max(closed_at.values()) < 2 + served_in + 1.5, max(closed_at.values())
    assert queue_counts(tenant, q)[0] == 1
    wait_for(lambda: fds(p.proc.pid) <= fds0 + 2, 10)
    print(f"300 stalled sockets closed after {max(closed_at.values()):.1f}s (timeout 2s)")
