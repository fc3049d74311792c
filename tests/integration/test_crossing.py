"""Closes that cross: the broker closes a channel while the client's (or the proxy's) own
Channel.Close is on its way. Each side's Close is answered with CloseOk, as RabbitMQ does, and
the channel id is free again only once both are done. The crossing is made to happen on purpose:
the relay holds the broker's frames until the client's Close has been sent."""

from __future__ import annotations

import threading
import time

import pika
import pytest
from pamqp import commands
from support import wait_for
from support.raw import RawAMQP

MISSING = "itest-crossing-missing-exchange"


def _close_outcome(conn: pika.BlockingConnection) -> str:
    try:
        conn.close()
        return "closed"
    except pika.exceptions.ChannelClosedByBroker as exc:
        return f"channel closed {exc.reply_code}"
    except Exception as exc:
        return type(exc).__name__


@pytest.mark.timeout(60)
def test_pika_close_after_refused_publishes_returns_as_on_a_direct_connection(
    proxy_factory, fault_relay, tenant
):
    """--no-park-channels forwards the client's Channel.Close; the broker's 404 crosses it."""
    p = proxy_factory("-t", "60", "--no-park-channels", upstream=fault_relay.url)
    outcomes = {}
    for name in ("direct", "proxy"):
        conn = p.connect(tenant) if name == "proxy" else _direct_via_relay(fault_relay, tenant)
        ch = conn.channel()
        fault_relay.hold_replies()  # the broker's Close(404) waits in the relay
        for _ in range(3):
            ch.basic_publish(MISSING, "k", b"x")
        result: dict[str, str] = {}

        def close(conn: pika.BlockingConnection = conn, result: dict[str, str] = result) -> None:
            result["out"] = _close_outcome(conn)

        closer = threading.Thread(target=close)
        closer.start()
        time.sleep(0.5)  # the client's Channel.Close is upstream now
        fault_relay.release_replies()
        closer.join(5)
        assert not closer.is_alive(), f"{name}: close() hung"
        outcomes[name] = result["out"]
    assert outcomes["proxy"] == outcomes["direct"], outcomes
    # the shared upstream connection is fine
    c = p.connect(tenant)
    c.channel().queue_declare("", exclusive=True)
    c.close()


def _direct_via_relay(fault_relay, tenant) -> pika.BlockingConnection:
    host, port = "127.0.0.1", fault_relay.port
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            host, port, tenant.vhost, pika.PlainCredentials(tenant.user, tenant.password)
        )
    )


@pytest.mark.timeout(60)
def test_raw_crossing_gets_close_then_close_ok_and_the_channel_is_usable_again(
    proxy_factory, fault_relay, tenant
):
    p = proxy_factory("-t", "60", "--no-park-channels", upstream=fault_relay.url)
    raw = RawAMQP(p.host, p.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost)
        raw.open_channel(1)
        fault_relay.hold_replies()
        raw.publish(1, MISSING, "k", b"x")
        raw.send(1, commands.Channel.Close(200, "bye", 0, 0))
        time.sleep(0.5)
        fault_relay.release_replies()
        close = raw.expect(commands.Channel.Close, 1)
        assert close.reply_code == 404
        raw.expect(commands.Channel.CloseOk, 1)
        raw.send(1, commands.Channel.CloseOk())
        raw.open_channel(1)  # the same id again, on the client's side
        raw.rpc(1, commands.Queue.Declare(queue="", exclusive=True), commands.Queue.DeclareOk)
    finally:
        raw.close()


@pytest.mark.timeout(60)
def test_an_id_is_not_reused_before_the_crossing_ends(proxy_factory, fault_relay, tenant):
    """The proxy closes a dirty channel (its client left) while the broker's 404 for it is on
    the way. With one channel per upstream connection, the quarantined id must not go to the
    next client before the broker's CloseOk: that client's channel works."""
    p = proxy_factory("-t", "60", "--max-upstream-channels", "1", upstream=fault_relay.url)
    raw = RawAMQP(p.host, p.port)
    raw.handshake(tenant.user, tenant.password, tenant.vhost)
    raw.open_channel(1)
    raw.rpc(1, commands.Basic.Qos(prefetch_count=5), commands.Basic.QosOk)  # dirty
    fault_relay.hold_replies()
    raw.publish(1, MISSING, "k", b"x")
    raw.send(0, commands.Connection.Close(200, "bye", 0, 0))
    raw.expect(commands.Connection.CloseOk, 0)  # the proxy's answer; it closes channel 1
    raw.abort()
    time.sleep(0.5)
    fault_relay.release_replies()  # Close(404) for channel 1, then CloseOk for ours
    wait_for(lambda: "404" in p.log(), 5)
    c = p.connect(tenant)
    ch = c.channel()
    ch.queue_declare("", exclusive=True)
    ch.basic_qos(prefetch_count=1)
    c.close()
