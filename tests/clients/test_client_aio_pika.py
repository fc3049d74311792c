"""aio-pika (aiormq, pamqp codec) through the proxy against the real broker."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import aio_pika
import aiormq
import pytest
from clientlib import (
    BODY_SIZES,
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

pytestmark = pytest.mark.timeout(60)


def run(coro, timeout: float = 45.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _aio_view(tv):
    """pamqp decodes T as an aware UTC datetime and D as Decimal; everything else as Python."""
    if isinstance(tv, dict):
        return {k: _aio_view(v) for k, v in tv.items()}
    tag, x = tv
    if tag == "T":
        return datetime.fromtimestamp(x, UTC)
    if tag == "F":
        return {k: _aio_view(v) for k, v in x.items()}
    if tag == "A":
        return [_aio_view(v) for v in x]
    return untyped(tv)


def _assert_props(msg: aio_pika.abc.AbstractIncomingMessage, expected: dict) -> None:
    got = {
        "content_type": msg.content_type,
        "content_encoding": msg.content_encoding,
        "delivery_mode": int(msg.delivery_mode),
        "priority": msg.priority,
        "correlation_id": msg.correlation_id,
        "reply_to": msg.reply_to,
        "expiration": msg.properties.expiration,
        "message_id": msg.message_id,
        "timestamp": int(msg.timestamp.timestamp()),
        "type": msg.type,
        "user_id": msg.user_id,
        "app_id": msg.app_id,
    }
    assert got == {k: v for k, v in expected.items() if k != "headers"}
    assert msg.headers == _aio_view(expected["headers"])
    h = msg.headers
    assert type(h["yes"]) is bool and type(h["f32"]) is float and h["f64"] == 3.25
    assert isinstance(h["dec"], Decimal) and h["void"] is None
    assert isinstance(h["bytes"], bytes | bytearray)  # pamqp: bytearray


def test_aio_pika_properties_and_header_types_round_trip(proxy, tenant, queues):
    q_in, q_out = queues.declare(tenant), queues.declare(tenant)
    expected = reference_properties(tenant.user)
    raw_publish(tenant, q_in, expected, body=b"ref", count=2)

    async def main():
        conn = await aio_pika.connect(proxy.url(tenant), timeout=10)
        async with conn:
            ch = await conn.channel()
            queue = await ch.get_queue(q_in, ensure=False)
            msg = await queue.get(no_ack=True, timeout=5)
            assert msg.body == b"ref"
            _assert_props(msg, expected)
            async with queue.iterator(no_ack=True) as it:
                async for msg in it:
                    assert msg.body == b"ref"
                    _assert_props(msg, expected)
                    break
            await ch.default_exchange.publish(
                aio_pika.Message(
                    b"out",
                    content_type="text/plain",
                    content_encoding="utf-8",
                    headers={
                        "str": "s",
                        "i8": -5,
                        "i16": -300,
                        "u16": 65535,
                        "i32": -70000,
                        "i64": -(2**40),
                        "f": 0.5,
                        "dec": Decimal("1.23"),
                        "yes": True,
                        "ts": datetime.fromtimestamp(REF_TIMESTAMP, UTC),
                        "table": {"a": {"b": 1}},
                        "array": [1, "x", [True]],
                        "bytes": bytearray(b"\x00\xff"),
                        "void": None,
                    },  # bytearray: pamqp
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    priority=9,
                    correlation_id="c",
                    reply_to="r",
                    expiration=1000,
                    message_id="m",  # seconds -> ms
                    timestamp=datetime.fromtimestamp(REF_TIMESTAMP, UTC),
                    type="t",
                    user_id=tenant.user,
                    app_id="a",
                ),
                routing_key=q_out,
            )

    run(main())
    msg = wait_for(lambda: raw_get(tenant, q_out), 5, message="outbound message not queued")
    assert msg.body == b"out"
    p = msg.properties
    assert {k: v for k, v in p.items() if k != "headers"} == {
        "content_type": "text/plain",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "priority": 9,
        "correlation_id": "c",
        "reply_to": "r",
        "expiration": "1000000",
        "message_id": "m",
        "timestamp": REF_TIMESTAMP,
        "type": "t",
        "user_id": tenant.user,
        "app_id": "a",
    }
    # pamqp picks the smallest integer tag; floats go out as single precision 'f'
    assert p["headers"] == {
        "str": ("S", "s"),
        "i8": ("b", -5),
        "i16": ("s", -300),
        "u16": ("u", 65535),
        "i32": ("I", -70000),
        "i64": ("l", -(2**40)),
        "f": ("f", 0.5),
        "dec": ("D", (2, 123)),
        "yes": ("t", True),
        "ts": ("T", REF_TIMESTAMP),
        "table": ("F", {"a": ("F", {"b": ("b", 1)})}),
        "array": ("A", [("b", 1), ("S", "x"), ("A", [("t", True)])]),
        "bytes": ("x", b"\x00\xff"),
        "void": ("V", None),
    }


def test_aio_pika_confirms_mandatory_return_and_tx(proxy, tenant, queues):
    q = queues.declare(tenant)

    async def main():
        conn = await aio_pika.connect(proxy.url(tenant), timeout=10)
        async with conn:
            ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
            confirms = [
                await ch.default_exchange.publish(
                    aio_pika.Message(f"c{i}".encode()), routing_key=q, mandatory=True
                )
                for i in range(20)
            ]
            assert all(isinstance(c, aiormq.spec.Basic.Ack) for c in confirms)
            with pytest.raises(aio_pika.exceptions.PublishError) as err:
                await ch.default_exchange.publish(
                    aio_pika.Message(b"lost", message_id="ret"),
                    routing_key="no-such-queue",
                    mandatory=True,
                )
            ret = err.value.frame
            assert (ret.reply_code, ret.reply_text, ret.routing_key) == (
                312,
                "NO_ROUTE",
                "no-such-queue",
            )
            assert err.value.message.body == b"lost"
            assert err.value.message.header.properties.message_id == "ret"

            tx_ch = await conn.channel(publisher_confirms=False)
            tx = tx_ch.transaction()
            await tx.select()
            await tx_ch.default_exchange.publish(aio_pika.Message(b"rolled-back"), routing_key=q)
            await tx.rollback()
            await tx_ch.default_exchange.publish(aio_pika.Message(b"committed"), routing_key=q)
            await asyncio.sleep(0.1)
            assert queue_counts(tenant, q)[0] == 20, "visible before Tx.Commit"
            await tx.commit()
            assert queue_counts(tenant, q)[0] == 21

    run(main())
    assert [b for b, _, _ in drain(tenant, q)] == [f"c{i}".encode() for i in range(20)] + [
        b"committed"
    ]


def test_aio_pika_qos_ack_nack_reject_recover_cancel(proxy, tenant, queues):
    q = queues.declare(tenant)

    async def main():
        conn = await aio_pika.connect(proxy.url(tenant), timeout=10)
        async with conn:
            ch = await conn.channel()
            for i in range(6):
                await ch.default_exchange.publish(aio_pika.Message(f"m{i}".encode()), routing_key=q)
            await ch.set_qos(prefetch_count=2)
            queue = await ch.get_queue(q, ensure=False)
            got: asyncio.Queue = asyncio.Queue()
            tag = await queue.consume(got.put)

            async def take(n: int) -> list:
                out = [await asyncio.wait_for(got.get(), 5) for _ in range(n)]
                await asyncio.sleep(0.2)
                assert got.empty(), "more deliveries than prefetch allows"
                return out

            m0, m1 = await take(2)
            assert (m0.body, m1.body) == (b"m0", b"m1")
            await m0.ack()
            (m2,) = await take(1)
            await m1.nack(requeue=True)
            (m1b,) = await take(1)
            assert m1b.body == b"m1" and m1b.redelivered
            await m2.reject(requeue=False)
            (m3,) = await take(1)
            assert m3.body == b"m3"
            await (await ch.get_underlay_channel()).basic_recover(requeue=True)  # m1b, m3 back
            again = await take(2)
            assert sorted(m.body for m in again) == [b"m1", b"m3"]
            assert all(m.redelivered for m in again)
            for m in again:
                await m.ack()
            m4, m5 = await take(2)
            await queue.cancel(tag)
            await ch.default_exchange.publish(aio_pika.Message(b"m6"), routing_key=q)
            await asyncio.sleep(0.3)
            assert got.empty(), "delivery after Basic.CancelOk"
            await m4.nack(requeue=True)
            await m5.nack(requeue=True)

    run(main())
    assert [b for b, _, _ in drain(tenant, q)] == [b"m4", b"m5", b"m6"]


@pytest.mark.timeout(120)
def test_aio_pika_bodies(proxy, tenant, queues):
    """aiormq cannot ask for a smaller frame_max (it always accepts the server's Tune), so the
    4096 case is covered by pika, py-amqp, Node and the raw client; here a 1 MiB message published
    directly is received through the proxy by get and by deliver at the default frame_max."""
    q, q4k = queues.declare(tenant), queues.declare(tenant)
    big = body_of(MIB, 5)
    raw_publish(tenant, q4k, {}, body=big, count=2)

    async def main():
        conn = await aio_pika.connect(proxy.url(tenant), timeout=10)
        async with conn:
            ch = await conn.channel()
            for i, size in enumerate(BODY_SIZES):
                await ch.default_exchange.publish(aio_pika.Message(body_of(size, i)), routing_key=q)
            queue = await ch.get_queue(q, ensure=False)
            for i, size in enumerate(BODY_SIZES[:3]):
                msg = await queue.get(no_ack=True, timeout=10)
                assert msg.body == body_of(size, i), f"{size} B body altered by get"
            seen = []
            async with queue.iterator(no_ack=True) as it:
                async for msg in it:
                    seen.append(hashlib.sha256(msg.body).hexdigest())
                    if len(seen) == 3:
                        break
            assert seen == [
                hashlib.sha256(body_of(s, i + 3)).hexdigest() for i, s in enumerate(BODY_SIZES[3:])
            ]
        conn = await aio_pika.connect(proxy.url(tenant), timeout=10)
        async with conn:
            ch = await conn.channel()
            queue = await ch.get_queue(q4k, ensure=False)
            msg = await queue.get(no_ack=True, timeout=10)
            assert msg.body == big
            async with queue.iterator(no_ack=True) as it:
                async for msg in it:
                    assert msg.body == big
                    break

    run(main(), timeout=100)


def test_aio_pika_exchanges_reply_to_rpc_and_broker_cancel(proxy, tenant, queues):
    tag = uuid.uuid4().hex[:6]
    q_topic, q_fan, q_hdr, rpc_q, doomed = (queues.declare(tenant) for _ in range(5))

    async def main():
        conn = await aio_pika.connect(proxy.url(tenant), timeout=10)
        server = await aio_pika.connect(proxy.url(tenant), timeout=10)
        async with conn, server:
            ch = await conn.channel()
            topic = await ch.declare_exchange(
                f"t-{tag}", aio_pika.ExchangeType.TOPIC, auto_delete=True
            )
            fan = await ch.declare_exchange(
                f"f-{tag}", aio_pika.ExchangeType.FANOUT, auto_delete=True
            )
            hdr = await ch.declare_exchange(
                f"h-{tag}", aio_pika.ExchangeType.HEADERS, auto_delete=True
            )
            await (await ch.get_queue(q_topic, ensure=False)).bind(topic, "*.x.#")
            await (await ch.get_queue(q_fan, ensure=False)).bind(fan)
            await (await ch.get_queue(q_hdr, ensure=False)).bind(
                hdr, arguments={"x-match": "all", "kind": "a"}
            )
            await fan.bind(topic, "e2e.#")  # exchange-to-exchange
            for rk in ("a.x", "a.x.b.c", "x.a", "e2e.y.z"):
                await topic.publish(aio_pika.Message(rk.encode()), routing_key=rk)
            await hdr.publish(aio_pika.Message(b"A", headers={"kind": "a"}), routing_key="")
            await hdr.publish(aio_pika.Message(b"B", headers={"kind": "b"}), routing_key="")
            await fan.unbind(topic, "e2e.#")
            await topic.publish(aio_pika.Message(b"late"), routing_key="e2e.q")

            # direct reply-to RPC
            sch = await server.channel()

            async def serve(msg):
                async with msg.process():
                    await sch.default_exchange.publish(
                        aio_pika.Message(msg.body[::-1], correlation_id=msg.correlation_id),
                        routing_key=msg.reply_to,
                    )

            await (await sch.get_queue(rpc_q, ensure=False)).consume(serve)
            replies: asyncio.Queue = asyncio.Queue()
            reply_q = await ch.get_queue("amq.rabbitmq.reply-to", ensure=False)
            await reply_q.consume(replies.put, no_ack=True)
            await ch.default_exchange.publish(
                aio_pika.Message(b"abc", correlation_id="rpc-1", reply_to="amq.rabbitmq.reply-to"),
                routing_key=rpc_q,
            )
            reply = await asyncio.wait_for(replies.get(), 5)
            assert (reply.body, reply.correlation_id) == (b"cba", "rpc-1")

            # broker-initiated cancel (aiormq advertises consumer_cancel_notify)
            cch = await conn.channel()

            async def ignore(message):
                pass

            ctag = await (await cch.get_queue(doomed, ensure=False)).consume(ignore)
            underlay = await cch.get_underlay_channel()  # the aiormq channel
            assert ctag in underlay.consumers
            with direct(tenant) as d:
                d.queue_delete(doomed)
            deadline = time.monotonic() + 5
            # aiormq drops the consumer when Basic.Cancel arrives; nothing signals it
            while ctag in underlay.consumers and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            assert ctag not in underlay.consumers, "Basic.Cancel from the broker not seen"
            assert not cch.is_closed and not conn.is_closed
            await cch.default_exchange.publish(aio_pika.Message(b"ok"), routing_key=q_fan)

    run(main())
    got = {
        k: [b for b, _, _ in drain(tenant, q)]
        for k, q in (("topic", q_topic), ("fan", q_fan), ("hdr", q_hdr))
    }
    assert got == {"topic": [b"a.x", b"a.x.b.c"], "fan": [b"e2e.y.z", b"ok"], "hdr": [b"A"]}


def test_aio_pika_wrong_user_id_and_channel_numbers(proxy, tenant, queues):
    q = queues.declare(tenant)

    async def main():
        conn = await aio_pika.connect(proxy.url(tenant), timeout=10)
        async with conn:
            good = await conn.channel(channel_number=2047)
            bad = await conn.channel(channel_number=5)
            with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed) as err:
                await bad.default_exchange.publish(
                    aio_pika.Message(b"forged", user_id="eve"), routing_key=q
                )
            assert "user_id" in str(err.value)
            await good.default_exchange.publish(aio_pika.Message(b"from-2047"), routing_key=q)
            for n in (1, 2, 999, 2046):
                ch = await conn.channel(channel_number=n)
                assert ch.number == n
                await ch.default_exchange.publish(
                    aio_pika.Message(f"from-{n}".encode()), routing_key=q
                )
                await ch.close()
            assert not conn.is_closed
            reopened = await conn.channel(channel_number=5)  # the closed id is usable again
            await reopened.default_exchange.publish(aio_pika.Message(b"from-5"), routing_key=q)

    run(main())
    assert [b for b, _, _ in drain(tenant, q)] == [
        b"from-2047",
        b"from-1",
        b"from-2",
        b"from-999",
        b"from-2046",
        b"from-5",
    ]


def test_reference_headers_used_here_are_complete():
    assert set(reference_headers()) >= {
        "i8",
        "i16",
        "i32",
        "i64",
        "f32",
        "f64",
        "dec",
        "ts",
        "table",
        "array",
        "bytes",
        "void",
        "yes",
        "no",
        "str",
    }
