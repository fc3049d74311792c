"""Instructions the proxy executes per connect-publish-close cycle (S3's unit of work), per
published message (S2's) and per message one by one (a confirm publisher waiting for each
confirm: one message per read, so the cost of a read shows), counted by callgrind:
deterministic where timed CPU is noisy, for A/B comparisons of two versions of the proxy on a
shared machine.

    python3 bench/callgrind.py [--src OTHER_CHECKOUT/src] [--cycles 200] [--messages 20000]
                               [--one-by-one 2000]

The proxy runs under ``valgrind --tool=callgrind`` against the broker on 127.0.0.1:5672;
counting starts after 50 warm-up cycles (``callgrind_control -z``) and the counters are dumped
after the measured work (``-d``). Kernel time is not counted (``/proc`` accounting in
``bench/run.py`` is). Cycles run one after another, so per-cycle costs are not shared between
concurrent clients; the S2 figure varies by a few percent with how the broker batches its
confirms, the cycle figure by well under one percent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastamqp
from pamqp import commands

REPO_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


class Counted:
    """A proxy under callgrind, and its counters."""

    def __init__(self, src: str, port: int, log_level: str) -> None:
        self.port = port
        self.out = tempfile.mkdtemp(prefix="amqproxy-callgrind-")
        env = dict(os.environ, PYTHONPATH=src, LOG_LEVEL=log_level)  # older versions: no option
        command = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}/cg.out.%p",
            sys.executable, "-m", "amqproxy", "-l", "127.0.0.1", "-p", str(port),
            "--http-port", "0", "amqp://127.0.0.1:5672",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def zero(self) -> None:
        subprocess.run(["callgrind_control", "-z", str(self.proc.pid)], capture_output=True)

    def dump(self) -> int:
        """Instructions since the last zero."""
        subprocess.run(["callgrind_control", "-d", str(self.proc.pid)], capture_output=True)
        time.sleep(0.5)
        newest = max(glob.glob(f"{self.out}/cg.out.*"), key=os.path.getmtime)
        with open(newest) as dump:
            for line in dump:
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        raise RuntimeError(f"no totals in {newest}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


@contextlib.asynccontextmanager
async def scratch_queue(queue: str) -> AsyncIterator[None]:
    """``queue`` on the broker itself for the measured work, deleted afterwards."""
    admin = await fastamqp.connect("127.0.0.1", 5672)
    admin.write(fastamqp._method(1, commands.Queue.Declare(queue=queue)))
    await admin.expect(50, 11)
    try:
        yield
    finally:
        admin.write(fastamqp._method(1, commands.Queue.Delete(queue=queue)))
        await admin.expect(50, 41)
        await admin.close()


async def measure(proxy: Counted, cycles: int, messages: int) -> tuple[float, float]:
    port, queue = proxy.port, f"amqproxy-callgrind-{proxy.port}"
    for _ in range(600):  # the proxy starts slowly under valgrind
        try:
            await (await fastamqp.connect("127.0.0.1", port)).close()
            break
        except (OSError, fastamqp.AMQPError):
            await asyncio.sleep(0.2)
    async with scratch_queue(queue):
        for i in range(50):
            await fastamqp.short_cycle("127.0.0.1", port, queue, i)
        proxy.zero()
        for i in range(cycles):
            await fastamqp.short_cycle("127.0.0.1", port, queue, 1000 + i)
        await asyncio.sleep(1.0)  # the last confirms, the last channel settled
        per_cycle = proxy.dump() / cycles
        conn = await fastamqp.connect("127.0.0.1", port)
        await conn.publish_many(queue, list(range(1000)))
        await conn.declare_passive(queue)
        proxy.zero()
        await conn.publish_many(queue, list(range(messages)))
        await conn.declare_passive(queue)
        await asyncio.sleep(2.0)  # the broker's confirms of the last ones
        per_message = proxy.dump() / messages
        await conn.close()
    return per_cycle, per_message


async def one_by_one(proxy: Counted, messages: int) -> float:
    """Instructions per message when every read holds one: a confirm publisher that waits
    for each confirm before the next publish (window 1) — where the cost per read shows."""
    port, queue = proxy.port, f"amqproxy-callgrind-one-{proxy.port}"
    async with scratch_queue(queue):
        conn = await fastamqp.connect("127.0.0.1", port)
        await conn.confirm_select()
        frames = fastamqp.build_publish_frames(queue, list(range(messages + 200)))
        await conn.publish_confirmed(frames[:200], window=1)
        proxy.zero()
        await conn.publish_confirmed(frames[200:], window=1)
        per_message = proxy.dump() / messages
        await conn.close()
    return per_message


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default=REPO_SRC, help="the src/ of the version to count")
    parser.add_argument("--port", type=int, default=5691)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--one-by-one", type=int, default=2000, help="window-1 confirm messages")
    parser.add_argument(
        "--log-level",
        default="warning",
        help="the proxy's (default warning: whether slow cycles under valgrind share a log "
        "write depends on timing, which would move the count; 'info' to include it)",
    )
    args = parser.parse_args()
    proxy = Counted(os.path.abspath(args.src), args.port, args.log_level)
    try:
        per_cycle, per_message = asyncio.run(measure(proxy, args.cycles, args.messages))
        per_one = asyncio.run(one_by_one(proxy, args.one_by_one))
    finally:
        proxy.stop()
    print(
        f"{args.src}: {per_cycle:,.0f} instructions per connect-publish-close cycle, "
        f"{per_message:,.0f} per published message, {per_one:,.0f} per message one by one"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
