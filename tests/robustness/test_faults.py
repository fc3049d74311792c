"""Faults between the proxy and a broker node of the tests' own (never the shared one): a reset
upstream, a path gone silent, a slow link, a broker restart. Publishers with confirms are told
promptly and every message the broker acked is there; publishers without confirms are not
told at all and every message they handed over is there (the outbox)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pika
import pytest
from support import FaultRelay, wait_for
from support.node import BrokerNode

GUEST = pika.PlainCredentials("guest", "guest")


@pytest.fixture(scope="module")
def node() -> Iterator[BrokerNode]:
    broker = BrokerNode("amqproxy-faults@localhost").start()
    yield broker
    broker.stop()


@pytest.fixture
def relay(node: BrokerNode) -> Iterator[FaultRelay]:
    r = FaultRelay(("127.0.0.1", node.plain_port)).start()
    yield r
    r.close()


def direct(node: BrokerNode) -> pika.BlockingConnection:
    return pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", node.plain_port, credentials=GUEST)
    )


@pytest.fixture
def queue(node: BrokerNode) -> Iterator[str]:
    name = f"faults-{time.monotonic_ns()}"
    conn = direct(node)
    conn.channel().queue_declare(name, durable=True)
    conn.close()
    yield name
    conn = direct(node)
    conn.channel().queue_delete(name)
    conn.close()


def bodies(node: BrokerNode, queue: str) -> list[bytes]:
    conn = direct(node)
    ch = conn.channel()
    out = []
    while True:
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append(body)
    conn.close()
    return out


class ConfirmPublisher(threading.Thread):
    """Publishes persistent messages with confirms until told to stop or its connection dies;
    records what the broker acked, and how the connection ended."""

    def __init__(self, proxy, queue: str, prefix: str) -> None:  # type: ignore[no-untyped-def]
        super().__init__(daemon=True)
        self.conn = pika.BlockingConnection(proxy.params(blocked_connection_timeout=30))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.queue, self.prefix = queue, prefix
        self.acked: list[bytes] = []
        self.ended: BaseException | None = None
        self.ended_at = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        persistent = pika.BasicProperties(delivery_mode=2)
        try:
            while not self.stop.is_set():
                body = f"{self.prefix}-{i}".encode()
                self.ch.basic_publish("", self.queue, body, persistent)
                self.acked.append(body)
                i += 1
                time.sleep(0.005)
        except Exception as exc:
            self.ended, self.ended_at = exc, time.monotonic()
        finally:
            if self.ended is None:
                self.conn.close()


def _code(exc: BaseException | None) -> int | None:
    return getattr(exc, "reply_code", None)


@pytest.mark.timeout(60)
def test_upstream_reset_tells_confirm_publishers_at_once(proxy_factory, node, relay, queue):
    p = proxy_factory("-t", "60", upstream=relay.url)
    pub = ConfirmPublisher(p, queue, "reset")
    pub.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    relay.cut()
    pub.join(5)
    assert not pub.is_alive(), "the publisher hung"
    assert _code(pub.ended) == 320 and pub.ended_at - t0 < 1.0, (pub.ended, pub.ended_at - t0)
    got = bodies(node, queue)
    assert set(pub.acked) <= set(got), "an acked message is missing"


@pytest.mark.timeout(60)
def test_silent_path_is_noticed_by_the_heartbeat(proxy_factory, node, relay, queue):
    p = proxy_factory("-t", "60", "--upstream-heartbeat", "2", upstream=relay.url)
    pub = ConfirmPublisher(p, queue, "silent")
    pub.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    relay.mode = "freeze"
    pub.join(10)
    assert not pub.is_alive(), "the publisher hung on a silent upstream"
    assert _code(pub.ended) == 320 and pub.ended_at - t0 < 6.0, (pub.ended, pub.ended_at - t0)
    relay.mode = "forward"
    got = bodies(node, queue)
    assert set(pub.acked) <= set(got)


@pytest.mark.timeout(60)
def test_slow_link_slows_publishers_and_loses_nothing(proxy_factory, node, relay, queue):
    p = proxy_factory("-t", "60", upstream=relay.url)
    relay.delay = 0.05  # 100 ms round trip
    pub = ConfirmPublisher(p, queue, "slow")
    pub.start()
    time.sleep(2.0)
    pub.stop.set()
    pub.join(10)
    assert pub.ended is None, pub.ended
    assert 5 < len(pub.acked) < 40, len(pub.acked)  # about one per round trip
    assert sorted(bodies(node, queue)) == sorted(pub.acked)


class PlainLoop(threading.Thread):
    """Publish-and-close cycles without confirms, persistent messages; what got CloseOk."""

    def __init__(self, proxy, queue: str) -> None:  # type: ignore[no-untyped-def]
        super().__init__(daemon=True)
        self.proxy, self.queue = proxy, queue
        self.ok: list[bytes] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        persistent = pika.BasicProperties(delivery_mode=2)
        while not self.stop.is_set():
            body = f"plain-{i}".encode()
            i += 1
            try:
                conn = pika.BlockingConnection(self.proxy.params(blocked_connection_timeout=30))
                ch = conn.channel()
                ch.basic_publish("", self.queue, body, persistent)
                ch.close()
                conn.close()
                self.ok.append(body)
            except Exception as exc:
                self.errors.append(repr(exc))
                time.sleep(0.05)


@pytest.mark.timeout(120)
def test_broker_restart(proxy_factory, node, queue):
    """The node restarts (about 3 s down). Confirm publishers are told (320) and reconnect;
    every acked message survives. A publish-and-close loop without confirms sees no error and
    every message it handed over is in the queue afterwards (at-least-once: duplicates are
    counted, not failures)."""
    p = proxy_factory("-t", "60", "--connect-timeout", "2", upstream=node.url)
    plain = PlainLoop(p, queue)
    plain.start()
    pub = ConfirmPublisher(p, queue, "confirm")
    pub.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    node.restart(down=1.0)
    pub.join(10)
    assert not pub.is_alive(), "the confirm publisher hung"
    # told as the broker goes down, not when heartbeats would notice (15 s): t0 is before
    # rabbitmqctl even starts, which alone takes a second or two on a busy machine
    assert _code(pub.ended) == 320 and pub.ended_at - t0 < 5.0, (pub.ended, pub.ended_at - t0)
    time.sleep(1.5)
    plain.stop.set()
    plain.join(30)
    assert plain.errors == [], plain.errors[:3]
    wait_for(lambda: p.metric("amqproxy_outbox_messages") == 0, 20)
    got = bodies(node, queue)
    assert set(pub.acked) <= set(got), "an acked message did not survive the restart"
    assert set(plain.ok) <= set(got), "a handed-over message is missing"
    duplicates = len(got) - len(set(got))
    print(
        f"restart: {len(plain.ok)} handed over without confirms, {len(pub.acked)} acked, "
        f"{duplicates} duplicates"
    )
