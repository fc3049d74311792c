"""Housekeeping, once a second: what nobody uses any more is closed, and memory goes back.

Channels released while replies or confirms were still due get ``SETTLE_TIMEOUT`` to settle;
parked channels nobody took for ``PARKED_IDLE`` close (a burst leaves many behind); upstream
connections unused for ``--idle-connection-timeout`` close, except the last one of a pool with
admitted clients and its last publish connection (where their channels open at once), and
those to an upstream address a reload replaced once nothing is leased or settling on them;
empty pools are forgotten; after a crowd of clients has left, freed heap pages go back to the
operating system.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Sized

from amqproxy.channel import Connection
from amqproxy.pool import Pool, PoolRegistry
from amqproxy.roles import PUBLISH

log = logging.getLogger("amqproxy.pool")

SWEEP_INTERVAL = 1.0
SETTLE_TIMEOUT = 30.0  # a released channel whose replies never come is closed after this
PARKED_IDLE = 60.0  # a parked channel nobody took for this long is closed
TRIM_AFTER_CLIENTS_LEFT = 200  # hand memory back once this many clients have gone


def sweep_pool(pool: Pool, now: float, idle_timeout: float) -> None:
    """Close the channels that never settled, those parked too long, and idle upstreams."""
    for up in list(pool.settling):
        if now - up.settling_since > SETTLE_TIMEOUT and up.conn.blocked_reason is None:
            pool.close_channel(up, "did not settle")
    while pool.parked and now - pool.parked[0].settling_since > PARKED_IDLE:
        pool.close_channel(pool.parked[0], "parked unused")
    for conn in list(pool.retired):
        if conn.open and not conn.leased and not any(up.conn is conn for up in pool.settling):
            log.info("closing upstream %s: the upstream address was replaced", conn.name)
            conn.close("upstream address replaced")
    if idle_timeout <= 0:
        return
    for conn in list(pool.upstreams):
        if not conn.open or conn.leased or now - conn.last_used < idle_timeout:
            continue
        if conn in pool.retired:
            continue
        if pool.clients and (_live_count(pool) == 1 or _last_publisher(pool, conn)):
            continue  # admitted clients keep one connection to open channels on
        log.info("closing idle upstream %s (unused for %.1fs)", conn.name, now - conn.last_used)
        conn.close("idle")


def _live_count(pool: Pool) -> int:
    return sum(1 for u in pool.upstreams if u.open and u not in pool.retired)


def _last_publisher(pool: Pool, conn: Connection) -> bool:
    """``conn`` is the pool's one live publish connection (``roles``)."""
    if conn.role != PUBLISH:
        return False
    live = (u for u in pool.upstreams if u.open and u not in pool.retired)
    return not any(u.role == PUBLISH and u is not conn for u in live)


def return_memory() -> None:
    """Give freed heap pages back to the OS (glibc); elsewhere the memory is only reused."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Janitor:
    """Sweeps the pools of ``registry``; watches ``clients`` (the open client sockets)."""

    def __init__(self, registry: PoolRegistry, clients: Sized) -> None:
        self.registry = registry
        self.clients = clients
        self._peak = 0

    def sweep(self, now: float) -> None:
        registry = self.registry
        idle_timeout = registry.settings.idle_connection_timeout
        for pool in list(registry.pools.values()):
            sweep_pool(pool, now, idle_timeout)
            registry.maybe_drop(pool)
        count = len(self.clients)
        self._peak = max(self._peak, count)
        if self._peak - count >= TRIM_AFTER_CLIENTS_LEFT and count <= self._peak // 2:
            return_memory()
            self._peak = count

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep(loop.time())
