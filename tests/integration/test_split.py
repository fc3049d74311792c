"""Publishers apart from consumers: within a pool, channels that consume ride on upstream
connections of their own (role "consume"), so the broker's flow control on a publishing
connection never stalls them (README, "Publishers apart from consumers").

The memory alarm tests raise the alarm on the test run's own node (``private_node``), never on
the shared broker; the others run against the shared broker with pika and aio-pika.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import aio_pika
import pika
import pytest
from pamqp import commands
from support import Tenant, direct, queue_counts, wait_for
from support.node import BrokerNode
from support.proxy import Proxy
from support.raw import RawAMQP

PREFILLED = 20


def upstreams(proxy: Proxy, tenant: Tenant) -> list[dict[str, Any]]:
    """The pool's rows of /api/upstreams."""
    url = f"http://{proxy.host}:{proxy.http_port}/api/upstreams"
    with urllib.request.urlopen(url, timeout=5) as response:
        rows = json.loads(response.read())["upstreams"]
    return [row for row in rows if row["pool"] == f"{tenant.user}@{tenant.vhost}"]


def roles(proxy: Proxy, tenant: Tenant) -> list[str]:
    return sorted(row["role"] for row in upstreams(proxy, tenant) if row["open"])


@contextlib.contextmanager
def memory_alarm(node: BrokerNode) -> Iterator[None]:
    """A memory alarm on the test run's own node (watermark 0.0001, as test_fidelity's),
    lifted whatever happens."""
    done = node.ctl("set_vm_memory_high_watermark", "0.0001")
    assert done.returncode == 0, done.stderr
    try:
        yield
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.4")


def unacked(node: BrokerNode, queue: str) -> int:
    done = node.ctl("list_queues", "-q", "--no-table-headers", "name", "messages_unacknowledged")
    for line in done.stdout.splitlines():
        name, _, count = line.partition("\t")
        if name == queue:
            return int(count)
    raise AssertionError(f"queue {queue} not listed: {done.stdout!r}")


def raw_client(proxy: Proxy, tenant: Tenant, name: str) -> RawAMQP:
    raw = RawAMQP(proxy.host, proxy.port)
    raw.handshake(tenant.user, tenant.password, tenant.vhost, connection_name=name)
    raw.open_channel(1)
    return raw


def receive(raw: RawAMQP, count: int, timeout: float) -> list[bytes]:
    """``count`` deliveries on channel 1, each acked as it arrives."""
    bodies = []
    deadline = time.monotonic() + timeout
    while len(bodies) < count:
        _, deliver, _ = raw.read_until(
            lambda _c, v: isinstance(v, commands.Basic.Deliver), deadline - time.monotonic()
        )
        _, header = raw.read_frame(deadline - time.monotonic())
        body = b""
        while len(body) < header.body_size:
            body += raw.read_frame(deadline - time.monotonic())[1].value
        raw.send(1, commands.Basic.Ack(delivery_tag=deliver.delivery_tag))
        bodies.append(body)
    return bodies


def blocked_publisher(proxy: Proxy, tenant: Tenant, queue: str) -> RawAMQP:
    """A client that published under the alarm, and that the broker blocked for it."""
    publisher = raw_client(proxy, tenant, "itest-split-publisher")
    publisher.publish(1, "", queue, b"under the alarm")
    publisher.expect(commands.Connection.Blocked, 0, timeout=15)
    time.sleep(0.5)
    assert queue_counts(tenant, queue)[0] == PREFILLED  # its publish did not reach the queue
    return publisher


def prefill(tenant: Tenant, queue: str) -> None:
    with direct(tenant) as ch:
        for i in range(PREFILLED):
            ch.basic_publish("", queue, f"prefilled {i}".encode())
    wait_for(lambda: queue_counts(tenant, queue)[0] == PREFILLED, 10)


# ---- the memory alarm --------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_consumer_on_the_pool_of_a_blocked_publisher_receives_and_acks(
    proxy_factory, private_node, node_user, queues
):
    tenant = node_user()
    proxy = proxy_factory("-t", "60", upstream=private_node.url)
    queue = queues.declare(tenant)
    prefill(tenant, queue)
    publisher = consumer = None
    try:
        with memory_alarm(private_node):
            publisher = blocked_publisher(proxy, tenant, queue)
            # the same credentials, connecting after the publisher got blocked: it declares
            # its queue, asks for a prefetch and consumes, as consumers do
            consumer = raw_client(proxy, tenant, "itest-split-consumer")
            consumer.rpc(1, commands.Queue.Declare(queue=queue), commands.Queue.DeclareOk, 10)
            consumer.rpc(1, commands.Basic.Qos(prefetch_count=5), commands.Basic.QosOk, 10)
            consumer.rpc(1, commands.Basic.Consume(queue=queue), commands.Basic.ConsumeOk, 10)
            bodies = receive(consumer, PREFILLED, timeout=20)
            assert bodies == [f"prefilled {i}".encode() for i in range(PREFILLED)]
            wait_for(lambda: unacked(private_node, queue) == 0, 10)  # the acks reached it
            assert queue_counts(tenant, queue)[0] == 0
            rows = upstreams(proxy, tenant)
            assert sorted(row["role"] for row in rows) == ["consume", "publish"]
            assert [row["blocked"] for row in rows if row["role"] == "publish"] != [None]
            assert [row["blocked"] for row in rows if row["role"] == "consume"] == [None]
            assert consumer.frames_for(0.5) == []  # the blocked publish is still held
        publisher.expect(commands.Connection.Unblocked, 0, timeout=20)
        assert receive(consumer, 1, timeout=20) == [b"under the alarm"]
    finally:
        for client in (publisher, consumer):
            if client is not None:
                client.abort()


@pytest.mark.timeout(120)
def test_without_the_split_the_consumer_waits_for_the_alarm_with_the_publisher(
    proxy_factory, private_node, node_user, queues
):
    """What the split prevents: ``--no-split-consumers``, the same steps, and the consumer's
    first method is not answered while the alarm lasts."""
    tenant = node_user()
    proxy = proxy_factory("-t", "60", "--no-split-consumers", upstream=private_node.url)
    queue = queues.declare(tenant)
    prefill(tenant, queue)
    publisher = consumer = None
    try:
        with memory_alarm(private_node):
            publisher = blocked_publisher(proxy, tenant, queue)
            consumer = raw_client(proxy, tenant, "itest-split-consumer")
            consumer.send(1, commands.Basic.Consume(queue=queue))
            with pytest.raises(TimeoutError):
                consumer.expect(commands.Basic.ConsumeOk, 1, timeout=3)
            assert roles(proxy, tenant) == ["publish"]
        consumer.expect(commands.Basic.ConsumeOk, 1, timeout=20)
        assert len(receive(consumer, PREFILLED + 1, timeout=20)) == PREFILLED + 1
    finally:
        for client in (publisher, consumer):
            if client is not None:
                client.abort()


# ---- clients that consume and publish (shared broker) ------------------------------------


def _consume(conn: pika.BlockingConnection, ch: Any, queue: str, count: int) -> list[bytes]:
    """``count`` messages from a consumer on ``ch``, acked; the consumer is cancelled then."""
    got: list[bytes] = []

    def on_message(channel: Any, method: Any, _props: Any, body: bytes) -> None:
        got.append(body)
        channel.basic_ack(method.delivery_tag)

    tag = ch.basic_consume(queue, on_message)
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    ch.basic_cancel(tag)
    return got


@pytest.mark.timeout(60)
def test_an_exclusive_queue_consumer_and_a_publisher_ride_apart(proxy, tenant):
    consumer = proxy.connect(tenant)
    publisher = proxy.connect(tenant)
    try:
        ch = consumer.channel()
        queue = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_qos(prefetch_count=10)
        pub = publisher.channel()
        for i in range(30):
            pub.basic_publish("", queue, f"m{i}".encode())
        assert _consume(consumer, ch, queue, 30) == [f"m{i}".encode() for i in range(30)]
        assert roles(proxy, tenant) == ["consume", "publish"]
        consume_row = next(r for r in upstreams(proxy, tenant) if r["role"] == "consume")
        assert consume_row["leased"] == 1  # the consumer's channel, nothing else
    finally:
        consumer.close()
        publisher.close()
    # its exclusive queue went with it, as on a direct connection
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        with direct(tenant) as check:
            check.queue_declare(queue, passive=True)


@pytest.mark.timeout(60)
def test_a_channel_that_published_then_consumes_still_works(proxy, tenant, queues):
    queue = queues.declare(tenant)
    conn = proxy.connect(tenant)
    try:
        ch = conn.channel()
        for i in range(3):
            ch.basic_publish("", queue, f"first {i}".encode())
        time.sleep(0.3)  # the proxy's confirms are in: the channel can move unnoticed
        assert _consume(conn, ch, queue, 3) == [f"first {i}".encode() for i in range(3)]
        ch.basic_publish("", queue, b"after consuming")  # it still publishes, where it is
        assert _consume(conn, ch, queue, 1) == [b"after consuming"]
        quick = conn.channel()  # publishes and consumes at once: it stays, and works
        quick.basic_publish("", queue, b"quick")
        assert _consume(conn, quick, queue, 1) == [b"quick"]
    finally:
        conn.close()
    assert proxy.metric("amqproxy_consumer_moves_total", **tenant.labels) >= 1


@pytest.mark.timeout(60)
def test_a_client_with_confirms_that_consumes_stays_where_it_is(proxy_factory, tenant, queues):
    proxy = proxy_factory("-t", "60")
    queue = queues.declare(tenant)
    conn = proxy.connect(tenant)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", queue, b"confirmed")
        ch.basic_qos(prefetch_count=5)
        assert _consume(conn, ch, queue, 1) == [b"confirmed"]
        ch.basic_publish("", queue, b"confirmed too")  # its confirm tags go on
        assert roles(proxy, tenant) == ["publish"]
    finally:
        conn.close()
    assert proxy.metric("amqproxy_consumer_moves_total", **tenant.labels) == 0


@pytest.mark.timeout(60)
def test_tx_clients_still_work(proxy, tenant, queues):
    queue = queues.declare(tenant)
    conn = proxy.connect(tenant)
    try:
        pub = conn.channel()
        pub.tx_select()
        pub.basic_publish("", queue, b"in a transaction")
        pub.tx_commit()
        wait_for(lambda: queue_counts(tenant, queue)[0] == 1, 5)
        sub = conn.channel()
        sub.tx_select()
        sub.basic_qos(prefetch_count=1)
        method, _, body = sub.basic_get(queue)
        assert body == b"in a transaction"
        sub.basic_ack(method.delivery_tag)
        sub.tx_commit()
        assert queue_counts(tenant, queue)[0] == 0
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_aio_pika_consumer_and_publisher_on_one_pool(proxy, tenant):
    async def run() -> list[bytes]:
        consumer = await aio_pika.connect(proxy.url(tenant), timeout=10)
        publisher = await aio_pika.connect(proxy.url(tenant), timeout=10)
        try:
            channel = await consumer.channel()
            await channel.set_qos(prefetch_count=10)
            queue = await channel.declare_queue(exclusive=True)
            pub = await publisher.channel(publisher_confirms=False)
            for i in range(20):
                await pub.default_exchange.publish(aio_pika.Message(f"a{i}".encode()), queue.name)
            got: list[bytes] = []
            async with queue.iterator() as messages:
                async for message in messages:
                    async with message.process():
                        got.append(message.body)
                    if len(got) == 20:
                        break
            assert roles(proxy, tenant) == ["consume", "publish"]
            return got
        finally:
            await consumer.close()
            await publisher.close()

    assert asyncio.run(asyncio.wait_for(run(), 30)) == [f"a{i}".encode() for i in range(20)]


@pytest.mark.timeout(60)
def test_at_the_connection_limit_a_consumer_stays_with_the_publishers(
    proxy_factory, tenant, queues
):
    proxy = proxy_factory("-t", "60", "--max-upstream-connections", "1")
    queue = queues.declare(tenant)
    conn = proxy.connect(tenant)
    try:
        ch = conn.channel()
        ch.basic_publish("", queue, b"one")
        sub = conn.channel()
        sub.basic_qos(prefetch_count=1)
        assert _consume(conn, sub, queue, 1) == [b"one"]
        assert roles(proxy, tenant) == ["publish"]
    finally:
        conn.close()
