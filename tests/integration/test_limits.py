"""Limits: --max-clients refuses the next client with a Connection.Close that says why (and one
WARNING, not one per client); --max-upstream-connections makes Channel.Open wait, in order, for
a channel another client frees, and after --pool-wait-timeout gives that one channel a 506
while the connection and its other channels carry on. The waits are in the metrics."""

from __future__ import annotations

import threading
import time
from typing import Any

import pika
import pytest
from support import UPSTREAM_CONNECTS, drain, reply_code_of, wait_for
from support.raw import RawAMQP, RawConnectionClose

REFUSAL = "CONNECTION_FORCED - amqproxy: too many client connections (max-clients 2)"
WAITING = "amqproxy_channels_waiting"
WAITS = "amqproxy_channel_waits_total"
WAIT_SECONDS = "amqproxy_channel_wait_seconds_total"
WAIT_TIMEOUTS = "amqproxy_channel_wait_timeouts_total"


def _connect_or_none(proxy, tenant) -> pika.BlockingConnection | None:
    try:
        return proxy.connect(tenant)
    except pika.exceptions.AMQPConnectionError:
        return None


@pytest.mark.timeout(60)
def test_max_clients_refuses_the_next_client_with_the_limit_in_the_close(
    proxy_factory, tenant, queues
):
    proxy = proxy_factory("-t", "60", "--max-clients", "2")
    q = queues.declare(tenant)
    first, second = proxy.connect(tenant), proxy.connect(tenant)
    for _ in range(3):
        with pytest.raises(pika.exceptions.AMQPConnectionError) as err:
            proxy.connect(tenant)
        # pika wraps a Close before OpenOk in ProbableAuthenticationError; the code and the
        # reason are in it for the user to read.
        assert reply_code_of(err.value) == 320, repr(err.value)
        assert REFUSAL in str(err.value)
    raw = RawAMQP(proxy.host, proxy.port)
    try:
        with pytest.raises(RawConnectionClose) as closed:  # in reply to StartOk, before Tune
            raw.handshake(tenant.user, tenant.password, tenant.vhost)
        assert (closed.value.reply_code, closed.value.reply_text) == (320, REFUSAL)
    finally:
        raw.abort()
    # The clients already served did not notice.
    ch = first.channel()
    ch.confirm_delivery()
    ch.basic_publish("", q, b"served")
    proxy.wait_metric("amqproxy_client_connections_refused_total", 4)
    lines = [line for line in proxy.log().splitlines() if "max-clients 2 reached" in line]
    assert len(lines) == 1, lines  # four refusals, one WARNING
    assert " WARNING " in lines[0] and "1 client connection(s) refused" in lines[0]
    assert not [
        line
        for line in proxy.log().splitlines()
        if "too many client connections" in line and " DEBUG " not in line
    ], "a refused client has a log line of its own"
    # A client leaves: the next one is served.
    second.close()
    third = wait_for(lambda: _connect_or_none(proxy, tenant), 10, interval=0.2)
    third.channel().basic_publish("", q, b"third")
    third.close()
    first.close()
    assert sorted(body for body, _, _ in drain(tenant, q)) == [b"served", b"third"]


class _OpenInThread:
    """``connection.channel()`` in a thread of its own: it blocks while the proxy holds the
    Channel.Open back."""

    def __init__(self, connection: pika.BlockingConnection) -> None:
        self.connection = connection
        self.channel: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.channel = self.connection.channel()
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float = 10.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "Channel.Open still waiting"
        if self.error is not None:
            raise self.error
        return self.channel


def _limited(proxy_factory, wait_timeout: str):
    return proxy_factory(
        "-t", "60",
        "--max-upstream-connections", "1",
        "--max-upstream-channels", "2",
        "--pool-wait-timeout", wait_timeout,
    )  # fmt: skip


@pytest.mark.timeout(60)
def test_channel_open_waits_in_order_for_channels_other_clients_release(
    proxy_factory, tenant, queues
):
    proxy = _limited(proxy_factory, "30")
    labels = tenant.labels
    q = queues.declare(tenant)
    holder = proxy.connect(tenant)
    held = [holder.channel(), holder.channel()]  # the one upstream connection is full
    first_conn, second_conn = proxy.connect(tenant), proxy.connect(tenant)
    first = _OpenInThread(first_conn)
    proxy.wait_metric(WAITING, 1, **labels)
    second = _OpenInThread(second_conn)
    proxy.wait_metric(WAITING, 2, **labels)

    held[0].close()  # clean: parked, and handed to the first in line
    ch1 = first.result()
    assert second.thread.is_alive(), "the second waiter was served before the first"
    assert proxy.metric(WAITING, **labels) == 1
    held[1].close()
    ch2 = second.result()

    for ch, body in ((ch1, b"one"), (ch2, b"two")):
        ch.confirm_delivery()
        ch.basic_publish("", q, body)
    metrics = proxy.metrics()
    assert metrics.get(WAITING, **labels) == 0
    assert metrics.get(WAITS, **labels) == 2
    assert metrics.get(WAIT_SECONDS, **labels) > 0
    assert metrics.get(WAIT_TIMEOUTS, **labels) == 0
    assert metrics.get(UPSTREAM_CONNECTS, **labels) == 1, "the limit of one was exceeded"
    for conn in (holder, first_conn, second_conn):
        conn.close()
    assert sorted(body for body, _, _ in drain(tenant, q)) == [b"one", b"two"]


@pytest.mark.timeout(60)
def test_channel_open_gets_a_channel_error_after_the_pool_wait_timeout(
    proxy_factory, tenant, queues
):
    proxy = _limited(proxy_factory, "1")
    labels = tenant.labels
    q = queues.declare(tenant)
    other = proxy.connect(tenant)
    other_channel = other.channel()
    conn = proxy.connect(tenant)
    kept = conn.channel()  # the second and last channel of the one upstream connection
    kept.confirm_delivery()

    started = time.monotonic()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        conn.channel()
    waited = time.monotonic() - started
    assert (err.value.reply_code, err.value.reply_text) == (
        506,
        "RESOURCE_ERROR - no upstream channel free within 1s (max-upstream-connections 1)",
    )
    assert waited >= 0.9, f"refused after {waited:.2f}s, before --pool-wait-timeout"

    # Only that channel failed: the connection and its other channel carry on.
    assert conn.is_open
    kept.basic_publish("", q, b"kept")
    other_channel.close()  # a channel is freed: the same connection gets one now
    again = conn.channel()
    again.confirm_delivery()
    again.basic_publish("", q, b"again")

    metrics = proxy.metrics()
    assert metrics.get(WAIT_TIMEOUTS, **labels) == 1
    assert metrics.get(WAITS, **labels) == 1
    assert metrics.get(WAIT_SECONDS, **labels) >= 0.9
    assert metrics.get(WAITING, **labels) == 0
    assert metrics.get(UPSTREAM_CONNECTS, **labels) == 1
    conn.close()
    other.close()
    assert sorted(body for body, _, _ in drain(tenant, q)) == [b"again", b"kept"]
