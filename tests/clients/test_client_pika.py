"""pika (BlockingConnection) through the proxy against the real broker: every feature a pika
user depends on, with exact values."""

from __future__ import annotations

import hashlib
import random
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pika
import pytest
from clientlib import (
    BODY_SIZES,
    FRAME_MAX,
    MIB,
    REF_TIMESTAMP,
    body_of,
    direct,
    drain,
    queue_counts,
    raw_get,
    raw_publish,
    reference_headers,
    reference_properties,
    untyped,
    wait_for,
)
from pika.exceptions import ChannelClosedByBroker, UnroutableError

pytestmark = pytest.mark.timeout(60)


def _pika_view(tv_headers):
    """What pika decodes from the typed reference table: timestamps become aware UTC datetimes,
    and floats are truncated to ints (pika 1.x decodes 'f'/'d' with ``long(...)``: a pika bug,
    the same on a direct connection; the exact float bits are checked by the raw-client tests)."""

    def conv(v):
        if isinstance(v, tuple):
            tag, x = v
            if tag == "T":
                return datetime.fromtimestamp(x, UTC)
            if tag in "fd":
                return int(x)
            if tag == "F":
                return {k: conv(y) for k, y in x.items()}
            if tag == "A":
                return [conv(y) for y in x]
            return untyped(v)
        return v

    return {k: conv(v) for k, v in tv_headers.items()}


def _assert_pika_props(props: pika.BasicProperties, expected: dict) -> None:
    got = {
        name: getattr(props, name)
        for name in (
            "content_type",
            "content_encoding",
            "delivery_mode",
            "priority",
            "correlation_id",
            "reply_to",
            "expiration",
            "message_id",
            "timestamp",
            "type",
            "user_id",
            "app_id",
        )
    }
    want = {k: v for k, v in expected.items() if k != "headers"}
    assert got == want
    assert props.headers == _pika_view(expected["headers"])
    # types survive, not just values (Python's 1 == True == 1.0 would hide a changed tag)
    h = props.headers
    assert type(h["yes"]) is bool and type(h["no"]) is bool and type(h["i8"]) is int
    assert isinstance(h["dec"], Decimal) and h["dec"] == Decimal("123.45")
    assert isinstance(h["bytes"], bytes) and h["void"] is None


def test_pika_properties_and_header_types_round_trip(proxy, tenant, queues):
    """Inbound: a message with all 13 properties and every field type (published directly with
    explicit tags) reaches pika through the proxy by get and by deliver, every value and type
    intact. Outbound: everything pika can encode arrives at the broker with the tags pika chose.
    (pika cannot encode floats in tables: its encoder raises for float; float decoding is
    covered by the inbound half.)"""
    q_in = queues.declare(tenant)
    q_out = queues.declare(tenant)
    expected = reference_properties(tenant.user)
    raw_publish(tenant, q_in, expected, body=b"ref", count=2)

    conn = proxy.connect(tenant)
    try:
        ch = conn.channel()
        method, props, body = ch.basic_get(q_in, auto_ack=True)
        assert body == b"ref"
        _assert_pika_props(props, expected)
        for method, props, body in ch.consume(q_in, auto_ack=True, inactivity_timeout=5):
            assert method is not None, "no delivery within 5 s"
            assert body == b"ref"
            _assert_pika_props(props, expected)
            break
        ch.cancel()

        out_headers = {
            "str": "h\u00e9llo",
            "i8": -5,
            "i32": 70000,
            "i64": 2**40,
            "neg": -(2**40),
            "dec": Decimal("-1.25"),
            "yes": True,
            "no": False,
            "ts": datetime.fromtimestamp(REF_TIMESTAMP, UTC),
            "table": {"k": "v", "inner": {"deep": True}},
            "array": ["a", 1, [2], {"x": None}],
            "bytes": b"\x00\xff",
            "void": None,
        }
        ch.basic_publish(
            "",
            q_out,
            b"out",
            pika.BasicProperties(
                content_type="text/plain",
                content_encoding="utf-8",
                headers=out_headers,
                delivery_mode=1,
                priority=0,
                correlation_id="c",
                reply_to="r",
                expiration="1000000",
                message_id="m",
                timestamp=REF_TIMESTAMP,
                type="t",
                user_id=tenant.user,
                app_id="a",
            ),
        )
    finally:
        conn.close()
    msg = wait_for(lambda: raw_get(tenant, q_out), 5, message="outbound message not queued")
    p = msg.properties
    assert msg.body == b"out"
    assert {k: v for k, v in p.items() if k != "headers"} == {
        "content_type": "text/plain",
        "content_encoding": "utf-8",
        "delivery_mode": 1,
        "priority": 0,
        "correlation_id": "c",
        "reply_to": "r",
        "expiration": "1000000",
        "message_id": "m",
        "timestamp": REF_TIMESTAMP,
        "type": "t",
        "user_id": tenant.user,
        "app_id": "a",
    }
    assert p["headers"] == {
        "str": ("S", "h\u00e9llo"),
        "i8": ("I", -5),
        "i32": ("I", 70000),
        "i64": ("l", 2**40),
        "neg": ("l", -(2**40)),
        "dec": ("D", (2, -125)),
        "yes": ("t", True),
        "no": ("t", False),
        "ts": ("T", REF_TIMESTAMP),
        "table": ("F", {"k": ("S", "v"), "inner": ("F", {"deep": ("t", True)})}),
        "array": ("A", [("S", "a"), ("I", 1), ("A", [("I", 2)]), ("F", {"x": ("V", None)})]),
        "bytes": ("x", b"\x00\xff"),
        "void": ("V", None),
    }


def test_pika_publisher_confirms_and_mandatory_return(proxy, tenant, queues):
    q = queues.declare(tenant)
    conn = proxy.connect(tenant)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for i in range(50):
            ch.basic_publish("", q, f"c{i}".encode(), mandatory=True)  # raises unless acked
        returned = []
        ch.add_on_return_callback(
            lambda _ch, method, props, body: returned.append(
                (
                    method.reply_code,
                    method.reply_text,
                    method.exchange,
                    method.routing_key,
                    body,
                    props.message_id,
                )
            )
        )
        with pytest.raises(UnroutableError) as err:
            ch.basic_publish(
                "amq.direct",
                "no-such-route",
                b"lost",
                mandatory=True,
                properties=pika.BasicProperties(message_id="ret-1"),
            )
        (ret,) = err.value.messages
        assert ret.method.reply_code == 312 and ret.method.reply_text == "NO_ROUTE"
        assert (ret.method.exchange, ret.method.routing_key, ret.body) == (
            "amq.direct",
            "no-such-route",
            b"lost",
        )
        assert ret.properties.message_id == "ret-1"
        # a non-mandatory unroutable publish is simply acked (dropped by the broker)
        ch.basic_publish("amq.direct", "no-such-route", b"dropped")
        ch.basic_publish("", q, b"after")  # the channel is still fine
    finally:
        conn.close()
    assert [b for b, _, _ in drain(tenant, q)] == [f"c{i}".encode() for i in range(50)] + [b"after"]


def test_pika_tx_select_commit_rollback(proxy, tenant, queues):
    q = queues.declare(tenant)
    conn = proxy.connect(tenant)
    try:
        ch = conn.channel()
        ch.tx_select()
        ch.basic_publish("", q, b"rolled-back")
        ch.tx_rollback()
        assert queue_counts(tenant, q)[0] == 0
        ch.basic_publish("", q, b"committed-1")
        ch.basic_publish("", q, b"committed-2")
        time.sleep(0.1)
        assert queue_counts(tenant, q)[0] == 0, "published before Tx.Commit"
        ch.tx_commit()
        assert queue_counts(tenant, q)[0] == 2
        # acks inside a transaction: rolled back, the message stays unacked then is requeued
        method, _, body = ch.basic_get(q)
        assert body == b"committed-1"
        ch.basic_ack(method.delivery_tag)
        ch.tx_rollback()
        ch.basic_recover(requeue=True)
        ch.tx_commit()
    finally:
        conn.close()
    assert sorted(b for b, _, _ in drain(tenant, q)) == [b"committed-1", b"committed-2"]


def test_pika_qos_ack_nack_reject_recover_cancel(proxy, tenant, queues):
    q = queues.declare(tenant)
    with_direct = [f"m{i}".encode() for i in range(6)]
    conn = proxy.connect(tenant)
    try:
        ch = conn.channel()
        for b in with_direct:
            ch.basic_publish("", q, b)
        ch.basic_qos(prefetch_count=2)
        got: list = []
        tag = ch.basic_consume(q, lambda _c, m, p, b: got.append((m, b)))

        def settle(n: int) -> None:
            deadline = time.monotonic() + 5
            while len(got) < n and time.monotonic() < deadline:
                conn.process_data_events(time_limit=0.05)
            conn.process_data_events(time_limit=0.2)  # give extra deliveries a chance

        settle(2)
        assert [b for _, b in got] == [b"m0", b"m1"], "prefetch 2 must stop at two deliveries"
        ch.basic_ack(got[0][0].delivery_tag)  # m0 done
        settle(3)
        assert [b for _, b in got] == [b"m0", b"m1", b"m2"]
        ch.basic_nack(got[1][0].delivery_tag, requeue=True)  # m1 back to the queue
        settle(4)
        m, b = got[3]
        assert b == b"m1" and m.redelivered is True
        ch.basic_reject(got[2][0].delivery_tag, requeue=False)  # m2 dropped
        settle(5)
        assert got[4][1] == b"m3"
        # two unacked (m1, m3): recover redelivers both, flagged
        ch.basic_recover(requeue=True)
        settle(7)
        redelivered = sorted(b for m, b in got[5:7] if m.redelivered)
        assert redelivered == [b"m1", b"m3"]
        ch.basic_ack(0, multiple=True)  # everything delivered so far: m1, m3
        settle(9)  # the window opens again: m4, m5
        assert [b for _, b in got[7:]] == [b"m4", b"m5"]
        ch.basic_cancel(tag)  # Cancel-Ok: no more deliveries; unacked m4, m5 stay unacked
        assert tag not in ch.consumer_tags
        ch.basic_publish("", q, b"m6")
        conn.process_data_events(time_limit=0.3)
        assert len(got) == 9, "delivery after Basic.Cancel"
        ch.basic_nack(0, multiple=True, requeue=True)  # m4, m5 back
    finally:
        conn.close()
    # m0, m1, m3 acked, m2 rejected (dropped); m4, m5 requeued (redelivered) before m6
    assert [b for b, _, _ in drain(tenant, q)] == [b"m4", b"m5", b"m6"]


@pytest.mark.timeout(120)
def test_pika_bodies_from_empty_to_10_mib(proxy, tenant, queues):
    q = queues.declare(tenant)
    conn = proxy.connect(tenant)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for i, size in enumerate(BODY_SIZES):
            ch.basic_publish("", q, body_of(size, i))
            ch.basic_publish("", q, body_of(size, i))
        for i, size in enumerate(BODY_SIZES):  # one copy by get through the proxy
            method, _, body = ch.basic_get(q, auto_ack=False)
            assert method is not None, f"size {size}: nothing to get"
            assert len(body) == size and body == body_of(size, i), f"size {size} altered"
            ch.basic_ack(method.delivery_tag)
            msg = raw_get(tenant, q)  # the other straight from the broker: stored intact
            assert msg is not None and len(msg.body) == size
            assert hashlib.sha256(msg.body).digest() == hashlib.sha256(body_of(size, i)).digest()
        for i, size in enumerate(BODY_SIZES):  # and by deliver
            ch.basic_publish("", q, body_of(size, i))
        seen = []
        for method, _, body in ch.consume(q, auto_ack=True, inactivity_timeout=10):
            assert method is not None, f"deliveries stopped after {len(seen)}"
            seen.append(body)
            if len(seen) == len(BODY_SIZES):
                break
        ch.cancel()
        assert [len(b) for b in seen] == BODY_SIZES
        assert seen == [body_of(s, i) for i, s in enumerate(BODY_SIZES)]
    finally:
        conn.close()


def test_pika_frame_max_4096_receives_1_mib_by_get_and_deliver(proxy, tenant, queues):
    q = queues.declare(tenant)
    body = body_of(MIB, 3)
    raw_publish(tenant, q, {"headers": reference_headers()}, body=body, count=2)
    conn = proxy.connect(tenant, frame_max=4096)
    try:
        assert conn._impl.params.frame_max == 4096  # negotiated, not just asked for
        ch = conn.channel()
        method, props, got = ch.basic_get(q, auto_ack=True)
        assert got == body
        assert props.headers["str"] == "hello w\u00f6rld \u2603"
        for method, _, got in ch.consume(q, auto_ack=True, inactivity_timeout=10):
            assert method is not None and got == body
            break
        ch.cancel()
        # and the other way: a 1 MiB publish in 4 KiB frames reaches the broker intact
        ch.basic_publish("", q, body)
    finally:
        conn.close()
    msg = wait_for(lambda: raw_get(tenant, q), 5)
    assert msg.body == body and max(msg.body_frame_sizes) == FRAME_MAX


def test_pika_topic_fanout_headers_and_exchange_to_exchange(proxy, tenant, queues):
    tag = uuid.uuid4().hex[:6]
    topic, fanout, hdrs, e2e = (f"{k}-{tag}" for k in ("topic", "fanout", "headers", "e2e"))
    qs = {
        k: queues.declare(tenant) for k in ("t_star", "t_hash", "f1", "f2", "h_all", "h_any", "e2e")
    }
    conn = proxy.connect(tenant)
    try:
        ch = conn.channel()
        ch.exchange_declare(topic, "topic", auto_delete=True)
        ch.exchange_declare(fanout, "fanout", auto_delete=True)
        ch.exchange_declare(hdrs, "headers", auto_delete=True)
        ch.exchange_declare(e2e, "topic", auto_delete=True)
        ch.queue_bind(qs["t_star"], topic, "a.*")
        ch.queue_bind(qs["t_hash"], topic, "a.#")
        ch.queue_bind(qs["f1"], fanout)
        ch.queue_bind(qs["f2"], fanout)
        ch.queue_bind(qs["h_all"], hdrs, arguments={"x-match": "all", "k": "v", "n": 1})
        ch.queue_bind(qs["h_any"], hdrs, arguments={"x-match": "any", "k": "v", "n": 1})
        ch.exchange_bind(destination=fanout, source=e2e, routing_key="to.fanout.#")
        ch.queue_bind(qs["e2e"], e2e, "#")
        ch.confirm_delivery()
        ch.basic_publish(topic, "a.b", b"ab")
        ch.basic_publish(topic, "a.b.c", b"abc")
        ch.basic_publish(topic, "x.y", b"xy", mandatory=False)
        ch.basic_publish(fanout, "ignored", b"fan")
        ch.basic_publish(hdrs, "", b"both", pika.BasicProperties(headers={"k": "v", "n": 1}))
        ch.basic_publish(hdrs, "", b"one", pika.BasicProperties(headers={"k": "v", "n": 2}))
        ch.basic_publish(e2e, "to.fanout.x", b"via-e2e")
        ch.exchange_unbind(destination=fanout, source=e2e, routing_key="to.fanout.#")
        ch.basic_publish(e2e, "to.fanout.y", b"after-unbind")
        ch.exchange_delete(e2e)
    finally:
        conn.close()
    got = {k: [b for b, _, _ in drain(tenant, q)] for k, q in qs.items()}
    assert got == {
        "t_star": [b"ab"],
        "t_hash": [b"ab", b"abc"],
        "f1": [b"fan", b"via-e2e"],
        "f2": [b"fan", b"via-e2e"],
        "h_all": [b"both"],
        "h_any": [b"both", b"one"],
        "e2e": [b"via-e2e", b"after-unbind"],
    }


def test_pika_direct_reply_to_rpc(proxy, tenant, queues):
    rpc_q = queues.declare(tenant)
    server = proxy.connect(tenant)
    client = proxy.connect(tenant)
    try:
        sch = server.channel()

        def serve(ch, method, props, body):
            ch.basic_publish(
                "",
                props.reply_to,
                body.upper(),
                pika.BasicProperties(correlation_id=props.correlation_id),
            )
            ch.basic_ack(method.delivery_tag)

        sch.basic_consume(rpc_q, serve)
        cch = client.channel()
        replies = []
        cch.basic_consume(
            "amq.rabbitmq.reply-to",
            lambda _c, m, p, b: replies.append((p.correlation_id, b)),
            auto_ack=True,
        )
        for i in range(3):
            cch.basic_publish(
                "",
                rpc_q,
                f"ping{i}".encode(),
                pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id=f"id{i}"),
            )
        deadline = time.monotonic() + 10
        while len(replies) < 3 and time.monotonic() < deadline:
            server.process_data_events(time_limit=0.02)
            client.process_data_events(time_limit=0.02)
        assert sorted(replies) == [(f"id{i}", f"PING{i}".encode()) for i in range(3)]
    finally:
        client.close()
        server.close()


def test_pika_broker_cancels_consumer_when_queue_deleted(proxy, tenant, queues):
    """pika advertises consumer_cancel_notify; deleting the queue must reach it as a
    Basic.Cancel from the broker, and the channel and connection stay usable."""
    q = queues.declare(tenant)
    conn = proxy.connect(tenant)
    try:
        ch = conn.channel()
        cancelled = []
        ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
        tag = ch.basic_consume(q, lambda *a: None)
        with direct(tenant) as dch:
            dch.queue_delete(q)
        deadline = time.monotonic() + 5
        while not cancelled and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.05)
        assert cancelled == [tag]
        assert tag not in ch.consumer_tags and ch.is_open and conn.is_open
        q2 = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_publish("", q2, b"still-works")
        assert ch.basic_get(q2, auto_ack=True)[2] == b"still-works"
    finally:
        conn.close()


def test_pika_wrong_user_id_closes_only_that_channel(proxy, tenant, queues):
    q = queues.declare(tenant)
    conn = proxy.connect(tenant)
    try:
        good = conn.channel()
        good.confirm_delivery()
        bad = conn.channel()
        bad.confirm_delivery()
        with pytest.raises(ChannelClosedByBroker) as err:
            bad.basic_publish("", q, b"forged", pika.BasicProperties(user_id="someone-else"))
        assert err.value.reply_code == 406
        assert "PRECONDITION_FAILED" in err.value.reply_text and "user_id" in err.value.reply_text
        assert conn.is_open and good.is_open and bad.is_closed
        good.basic_publish("", q, b"genuine", pika.BasicProperties(user_id=tenant.user))
        again = conn.channel()  # new channels still open fine
        again.basic_publish("", q, b"again")
        time.sleep(0.1)
    finally:
        conn.close()
    assert [b for b, _, _ in drain(tenant, q)] == [b"genuine", b"again"]


def test_pika_arbitrary_channel_numbers_up_to_channel_max(proxy, tenant, queues):
    q = queues.declare(tenant)
    rng = random.Random(4)
    numbers = [2047, 1, 2, 1024, *rng.sample(range(3, 2047), 5)]
    conn = proxy.connect(tenant)
    try:
        assert conn._impl.params.channel_max == 2047
        chans = {n: conn.channel(channel_number=n) for n in numbers}
        for n, ch in chans.items():
            assert ch.channel_number == n
            ch.confirm_delivery()
            ch.basic_publish("", q, str(n).encode())
        for n in numbers:  # FIFO: each channel gets the message the same channel published
            assert chans[n].basic_get(q, auto_ack=True)[2] == str(n).encode()
        for ch in chans.values():
            ch.close()
        assert conn.is_open
    finally:
        conn.close()
