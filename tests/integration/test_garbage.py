"""A client that comes and goes leaves nothing for the cycle collector.

Thousands of short-lived clients a second: if each left its objects in reference cycles, the
cycle collector would run every few hundred clients and walk them all. The proxy runs in this
process here (its real listener and upstream), pika clients in a thread, and every object the
collector finds unreachable afterwards is counted by type.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter

import pika
import pytest
from support.broker import Tenant
from support.util import BROKER_HOST, BROKER_PORT, free_port

from amqproxy.cli import settings_from
from amqproxy.server import Proxy


def _cycles(port: int, tenant: Tenant, queue: str, n: int) -> None:
    params = pika.ConnectionParameters(
        "127.0.0.1",
        port,
        tenant.vhost,
        pika.PlainCredentials(tenant.user, tenant.password),
    )
    for i in range(n):
        conn = pika.BlockingConnection(params)
        channel = conn.channel()
        channel.basic_publish("", queue, f"msg-{i}".encode())
        if i % 2:
            channel.close()
        conn.close()


def _proxy_garbage() -> Counter[str]:
    gc.collect()
    found = Counter(
        type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("amqproxy")
    )
    gc.garbage.clear()
    return found


@pytest.mark.timeout(60)
def test_a_client_that_leaves_leaves_no_reference_cycles(tenant, queues) -> None:
    queue = queues.declare(tenant)
    port = free_port()
    upstream = f"amqp://{BROKER_HOST}:{BROKER_PORT}"
    settings, _ = settings_from(["-l", "127.0.0.1", "-p", str(port), "-b", "0", upstream])

    async def main() -> Counter[str]:
        proxy = Proxy(settings)
        running = asyncio.create_task(proxy.run())
        while not proxy.listening:  # noqa: ASYNC110 (the proxy has no event for it)
            await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _cycles, port, tenant, queue, 5)  # a warm pool
        await asyncio.sleep(0.2)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.disable()
        try:
            gc.garbage.clear()
            await loop.run_in_executor(None, _cycles, port, tenant, queue, 20)
            await asyncio.sleep(0.2)  # the last client's socket is closed on the proxy's side
            found = _proxy_garbage()
        finally:
            gc.set_debug(0)
            gc.enable()
        proxy.stop()
        await running
        return found

    assert asyncio.run(main()) == Counter()
