"""Soak: mixed clients through one proxy for a long time, its vital signs sampled every second.

    python3 bench/soak.py                 # 10 minutes (the figures in the README)
    python3 bench/soak.py --minutes 1     # a quick look

Clients, all at once, against the shared broker on 127.0.0.1:5672:
  * 20 short-lived publisher loops (connect, channel, publish, close: the PHP pattern),
  * 2 publishers with confirms on long-lived connections (windows of 50),
  * 2 long-lived consumers (no-ack) that drain what the short-lived loops publish,
  * a bad client every 0.2 s: one of a dozen malformed inputs the proxy must refuse.
Every second: the proxy's RSS and open file descriptors, upstream and client connections, the
outbox, and the cycles and errors of the good clients. The run passes when the lines are flat:
RSS and FDs in the last minute within a small margin of the second minute, at most two upstream
connections, no error in a good client, exact message counts. Writes a JSON with every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastamqp
from common import RESULTS_DIR, Admin, Proxy, rss_kib

HEADER = b"AMQP\x00\x00\x09\x01"
BAD_INPUTS = [  # sent after the handshake and Channel.Open on channel 1
    bytes.fromhex("01000100000007005a000aa0ef24ce"),  # Tx.Select with stray arguments
    bytes.fromhex("01000100000007003c005ae0652ece"),  # Basic.Reject, 3 bytes of arguments
    bytes.fromhex("01000100000005003c007815ce"),  # Basic.Nack, 1 byte
    bytes.fromhex("01000100000004000a0032ce"),  # Connection.Close on channel 1
    bytes.fromhex("01000100000004003c0028ce"),  # empty Basic.Publish
    b"\x09\x00\x01\x00\x00\x00\x01x\xce",  # unknown frame type
    b"\x01\x00\x01\x7f\xff\xff\xf0xx",  # huge size
    b"\x02\x00\x01\x00\x00\x00\x04\x00\x3c\x00\x00\xce",  # header without publish
    bytes.fromhex("01000100000008003c0028000000") + b"\x00\xce",  # publish a byte too long
]


def _deep_declare() -> bytes:
    inner = b""
    for _ in range(2000):
        inner = b"\x01kF" + struct.pack(">I", len(inner)) + inner
    args = struct.pack(">I", len(inner)) + inner
    payload = struct.pack(">HHH", 50, 10, 0) + b"\x00\x00" + args
    return struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce"


BAD_INPUTS.append(_deep_declare())


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    def __init__(self, proxy: Proxy, queue: str, confirm_queue: str, seconds: float) -> None:
        self.proxy = proxy
        self.queue = queue
        self.confirm_queue = confirm_queue
        self.deadline = time.monotonic() + seconds
        self.cycles = 0
        self.confirmed = 0
        self.consumed = 0
        self.bad = 0
        self.errors: list[str] = []
        self.samples: list[dict[str, Any]] = []

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    async def short_lived(self, k: int) -> None:
        i = 0
        while self.running():
            try:
                await fastamqp.short_cycle("127.0.0.1", self.proxy.port, self.queue, k * 10**7 + i)
                self.cycles += 1
            except Exception as exc:
                self.errors.append(f"short-lived: {exc!r}")
                await asyncio.sleep(0.1)
            i += 1

    async def confirming(self, k: int) -> None:
        conn = await fastamqp.connect("127.0.0.1", self.proxy.port)
        await conn.confirm_select()
        i = 0
        try:
            while self.running():
                ids = list(range(k * 10**8 + i, k * 10**8 + i + 200))
                i += 200
                nacks = await conn.publish_confirmed(
                    fastamqp.build_publish_frames(self.confirm_queue, ids), window=50
                )
                self.confirmed += len(ids) - nacks
                if nacks:
                    self.errors.append(f"confirming: {nacks} nacks")
                await asyncio.sleep(0.05)
            await conn.close()
        except Exception as exc:
            self.errors.append(f"confirming: {exc!r}")
            conn.abort()

    async def consuming(self) -> None:
        while self.running():
            conn = await fastamqp.connect("127.0.0.1", self.proxy.port)
            try:
                ids = await conn.consume(self.queue, 200, no_ack=True, within=5)
                self.consumed += len(ids)
                await conn.close()
            except Exception as exc:
                self.consumed += len(conn.ids)  # no-ack: what arrived before the end is taken
                if self.running():
                    self.errors.append(f"consuming: {exc!r}")
                conn.abort()

    async def bad_clients(self) -> None:
        n = 0
        while self.running():
            data = BAD_INPUTS[n % len(BAD_INPUTS)]
            n += 1
            try:
                conn = await fastamqp.connect("127.0.0.1", self.proxy.port)
                conn.write(data)
                await asyncio.sleep(0.05)
                conn.abort()
                self.bad += 1
            except Exception:
                pass
            await asyncio.sleep(0.2)

    async def sampler(self) -> None:
        t0 = time.monotonic()
        while self.running():
            m = await asyncio.to_thread(self.proxy.metrics)
            pid = self.proxy.pid
            self.samples.append(
                {
                    "t": round(time.monotonic() - t0, 1),
                    "rss_kib": rss_kib(pid),
                    "fds": fds(pid),
                    "upstreams": m.get("amqproxy_upstream_connections", 0.0),
                    "clients": m.get("amqproxy_client_connections_total_open", 0.0),
                    "outbox": m.get("amqproxy_outbox_messages", 0.0),
                    "cycles": self.cycles,
                    "confirmed": self.confirmed,
                    "consumed": self.consumed,
                    "bad": self.bad,
                    "errors": len(self.errors),
                }
            )
            await asyncio.sleep(1.0)

    async def run(self) -> None:
        await asyncio.gather(
            *(self.short_lived(k) for k in range(20)),
            *(self.confirming(k) for k in range(2)),
            *(self.consuming() for _ in range(2)),
            self.bad_clients(),
            self.sampler(),
        )


def verdict(soak: Soak) -> tuple[bool, list[str]]:
    s = soak.samples
    minute = max(1, min(60, len(s) // 4))
    early, late = s[minute : 2 * minute], s[-minute:]
    rss_early = statistics.median(x["rss_kib"] for x in early)
    rss_late = statistics.median(x["rss_kib"] for x in late)
    fds_early = max(x["fds"] for x in early)
    fds_late = max(x["fds"] for x in late)
    upstreams = max(x["upstreams"] for x in s)
    lines = [
        f"samples {len(s)}; cycles {soak.cycles}, confirmed {soak.confirmed}, consumed "
        f"{soak.consumed}, bad clients {soak.bad}, errors {len(soak.errors)}",
        f"RSS median {rss_early:.0f} KiB (2nd window) -> {rss_late:.0f} KiB (last window)",
        f"FDs max {fds_early} -> {fds_late}; upstream connections max {upstreams:.0f}",
    ]
    ok = (
        rss_late - rss_early < 8 * 1024
        and fds_late <= fds_early + 20
        and upstreams <= 2
        and not soak.errors
    )
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--json", help="where to write the samples (default bench/results/)")
    args = ap.parse_args(argv)
    admin = Admin(5672)
    queue, confirm_queue = admin.new_queue("soak"), admin.new_queue("soak-confirm")
    proxy = Proxy("amqp://127.0.0.1:5672").start()
    soak = Soak(proxy, queue, confirm_queue, args.minutes * 60)
    try:
        fastamqp.run(soak.run())
        time.sleep(2)
        left = admin.settled_count(queue, max(0, soak.cycles - soak.consumed))
        stored = admin.settled_count(confirm_queue, soak.confirmed)
    finally:
        proxy.stop()
        admin.delete(queue)
        admin.delete(confirm_queue)
        admin.close()
    ok, lines = verdict(soak)
    exact = left == soak.cycles - soak.consumed and stored == soak.confirmed
    lines.append(
        f"messages: {soak.cycles} published = {soak.consumed} consumed + {left} left "
        f"({'exact' if left == soak.cycles - soak.consumed else 'MISMATCH'}); "
        f"{soak.confirmed} confirmed, {stored} stored"
    )
    for line in lines:
        print(line)
    for err in soak.errors[:10]:
        print("  error:", err)
    ok = ok and exact
    print("FLAT" if ok else "NOT FLAT")
    out = args.json or os.path.join(RESULTS_DIR, time.strftime("soak-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"ok": ok, "summary": lines, "errors": soak.errors, "samples": soak.samples}, f)
    print(f"samples written to {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
