"""A consumer that leaves (channel close, connection close, SIGKILL) leaves no consumer upstream;
its unacked messages are requeued and the next client gets them with redelivered=True."""

from __future__ import annotations

import asyncio
import selectors
import subprocess
import sys
import textwrap
import time

import aio_pika
import pytest
from pamqp import commands
from support import direct, list_consumers, queue_counts, wait_for
from support.raw import RawAMQP

N = 5


def _fill(tenant, q, n=N):
    with direct(tenant) as ch:
        for i in range(n):
            ch.basic_publish("", q, f"m{i}".encode())
    wait_for(lambda: queue_counts(tenant, q)[0] == n, 5)


def _assert_gone_and_requeued(proxy, tenant, q, n=N):
    wait_for(
        lambda: queue_counts(tenant, q) == (n, 0),
        5,
        message=lambda: f"(ready, consumers) of {q} = {queue_counts(tenant, q)}, expected ({n}, 0)",
    )
    assert q not in list_consumers(tenant.vhost)
    # the next client of the same pool (probably on a reused channel) gets them, redelivered
    conn = proxy.connect(tenant)
    try:
        ch = conn.channel()
        got = []
        for _ in range(n):
            method, _, body = ch.basic_get(q, auto_ack=True)
            assert method is not None, f"only {len(got)} of {n} messages came back"
            got.append((body, method.redelivered))
        assert sorted(got) == [(f"m{i}".encode(), True) for i in range(n)]
    finally:
        conn.close()


@pytest.mark.timeout(40)
@pytest.mark.parametrize("how", ["channel-close", "connection-close"])
def test_consumer_that_leaves_cleanly_is_cancelled_and_unacked_requeued(proxy, tenant, queues, how):
    q = queues.declare(tenant)
    _fill(tenant, q)
    conn = proxy.connect(tenant)
    ch = conn.channel()
    got = []
    ch.basic_consume(q, lambda c, m, p, b: got.append(m.delivery_tag), auto_ack=False)
    deadline = time.monotonic() + 5
    while len(got) < N and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    assert len(got) == N, f"consumer got {len(got)} of {N} deliveries"
    assert queue_counts(tenant, q) == (0, 1)
    if how == "channel-close":
        ch.close()
        _assert_gone_and_requeued(proxy, tenant, q)
        conn.close()
    else:
        conn.close()
        _assert_gone_and_requeued(proxy, tenant, q)


CONSUMER_SCRIPT = textwrap.dedent(
    """
    import sys, pika
    host, port, user, pw, vhost, queue, n = sys.argv[1:8]
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        host, int(port), vhost, pika.PlainCredentials(user, pw)))
    ch = conn.channel()
    seen = []
    def on_message(c, m, p, b):
        seen.append(b)
        if len(seen) == int(n):
            print("ready", flush=True)
    ch.basic_consume(queue, on_message, auto_ack=False)
    ch.start_consuming()
    """
)


@pytest.mark.timeout(40)
def test_consumer_killed_with_sigkill_is_cancelled_and_unacked_requeued(
    proxy, tenant, queues, tmp_path
):
    q = queues.declare(tenant)
    _fill(tenant, q)
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER_SCRIPT)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            proxy.host,
            str(proxy.port),
            tenant.user,
            tenant.password,
            tenant.vhost,
            q,
            str(N),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 15
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline and "ready" not in line:
            if sel.select(timeout=0.2):
                line = proc.stdout.readline()
                if not line and proc.poll() is not None:
                    break
        assert "ready" in line, f"consumer never got {N} messages: {proc.stderr.read()}"
        assert queue_counts(tenant, q) == (0, 1)
        proc.kill()
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    _assert_gone_and_requeued(proxy, tenant, q)


@pytest.mark.timeout(40)
def test_aio_pika_consumer_disconnect_requeues(proxy, tenant, queues):
    q = queues.declare(tenant)
    _fill(tenant, q)

    async def run() -> None:
        conn = await aio_pika.connect(proxy.url(tenant), timeout=10)
        ch = await conn.channel()
        queue = await ch.get_queue(q, ensure=False)
        got = []
        done = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            got.append(message)  # never acked
            if len(got) == N:
                done.set()

        await queue.consume(on_message, no_ack=False)
        await asyncio.wait_for(done.wait(), 5)
        await conn.close()

    asyncio.run(run())
    _assert_gone_and_requeued(proxy, tenant, q)


@pytest.mark.timeout(30)
def test_consumer_cancel_notification_reaches_the_client(proxy, tenant, queues):
    """The broker cancels a consumer when its queue is deleted; the client (which advertised
    consumer_cancel_notify) gets Basic.Cancel, and the connection stays usable."""
    q = queues.declare(tenant)
    raw = RawAMQP(proxy.host, proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost)
        raw.open_channel(1)
        ok = raw.rpc(
            1, commands.Basic.Consume(queue=q, consumer_tag="itest-ctag"), commands.Basic.ConsumeOk
        )
        assert ok.consumer_tag == "itest-ctag"
        with direct(tenant) as ch:
            ch.queue_delete(q)
        cancel = raw.expect(commands.Basic.Cancel, 1, timeout=5)
        assert cancel.consumer_tag == "itest-ctag"
        raw.rpc(1, commands.Queue.Declare(queue="", exclusive=True), commands.Queue.DeclareOk)
    finally:
        raw.close()
