"""Node amqplib (tests/clients/node/driver.js, run as a subprocess) through the proxy against
the real broker. amqplib has no transactions and picks channel numbers itself: tx and channel
ids are covered by the Python, PHP and raw clients."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from clientlib import (
    BODY_SIZES,
    BROKER_HOST,
    BROKER_PORT,
    MIB,
    REF_TIMESTAMP,
    body_of,
    conn_args,
    drain,
    node,
    raw_get,
    raw_publish,
    reference_properties,
    wait_for,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("need_node")]


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_node_properties_and_header_types_round_trip(proxy, tenant, queues):
    """The same driver run directly against the broker and through the proxy must see the same
    thing, and what it sees is checked value by value; what it publishes is checked tag by tag
    and must be byte-identical to what it publishes on a direct connection."""
    expected = reference_properties(tenant.user)
    runs = {}
    for name, host, port in (
        ("direct", BROKER_HOST, BROKER_PORT),
        ("proxy", proxy.host, proxy.port),
    ):
        q_in, q_out = queues.declare(tenant), queues.declare(tenant)
        raw_publish(tenant, q_in, expected, body=b"ref", count=2)
        seen = node("props", {**conn_args(tenant, host, port), "q_in": q_in, "q_out": q_out})
        runs[name] = (seen, wait_for(lambda q=q_out: raw_get(tenant, q), 5))
    (direct_seen, direct_out), (seen, out) = runs["direct"], runs["proxy"]

    assert seen == direct_seen
    for how in ("get", "deliver"):
        p = seen[how]["properties"]
        assert seen[how]["body"] == "ref"
        assert {
            k: p[k]
            for k in (
                "contentType",
                "contentEncoding",
                "deliveryMode",
                "priority",
                "correlationId",
                "replyTo",
                "expiration",
                "messageId",
                "timestamp",
                "type",
                "userId",
                "appId",
            )
        } == {
            "contentType": "application/json",
            "contentEncoding": "identity",
            "deliveryMode": 2,
            "priority": 7,
            "correlationId": "corr-42",
            "replyTo": "reply-queue",
            "expiration": "600000",
            "messageId": "msg-42",
            "timestamp": REF_TIMESTAMP,
            "type": "test.type",
            "userId": tenant.user,
            "appId": "amqproxy-client-tests",
        }
        assert p["headers"] == {
            "str": "hello w\u00f6rld \u2603",
            "empty": "",
            "i8": -5,
            "i16": -300,
            "i32": -70000,
            "i64": -5000000000,
            "f32": 1.5,
            "f64": 3.25,
            "dec": {"!": "decimal", "value": {"places": 2, "digits": 12345}},
            "yes": True,
            "no": False,
            "ts": {"!": "timestamp", "value": REF_TIMESTAMP},
            "table": {"k": "v", "n": 1, "inner": {"deep": True}},
            "array": ["a", 2, True, {"x": "y"}, [3]],
            "bytes": {"$bytes": "0001feff"},
            "void": None,
        }

    assert out.properties_raw == direct_out.properties_raw
    assert out.body == b"out"
    p = out.properties
    assert {k: v for k, v in p.items() if k != "headers"} == {
        "content_type": "text/plain",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "priority": 5,
        "correlation_id": "c",
        "reply_to": "r",
        "expiration": "10000",
        "message_id": "m",
        "timestamp": REF_TIMESTAMP,
        "type": "t",
        "user_id": tenant.user,
        "app_id": "node",
    }
    assert p["headers"] == {
        "str": ("S", "n\u00f6de"),
        "i8": ("b", -5),
        "u8": ("B", 200),
        "i16": ("s", -300),
        "u16": ("u", 65535),
        "i32": ("I", -70000),
        "u32": ("i", 4000000000),
        "i64": ("l", -5000000000),
        "auto": ("I", 70000),
        "f32": ("f", 1.5),
        "f64": ("d", 3.25),
        "dec": ("D", (2, 12345)),
        "ts": ("T", REF_TIMESTAMP),
        "yes": ("t", True),
        "no": ("t", False),
        "table": ("F", {"k": ("S", "v"), "inner": ("F", {"deep": ("t", True)})}),
        "array": ("A", [("S", "a"), ("b", 1), ("A", [("t", True)])]),
        "bytes": ("x", b"\x00\x01\xfe\xff"),
        "void": ("V", None),
    }


def test_node_confirms_return_qos_ack_nack_reject_recover_cancel(proxy, tenant, queues):
    q, q2 = queues.declare(tenant), queues.declare(tenant)
    out = node("features", {**conn_args(tenant, proxy.host, proxy.port), "q": q, "q2": q2})
    assert out["acked"] == 20
    assert out["returns"] == [
        {
            "replyCode": 312,
            "replyText": "NO_ROUTE",
            "exchange": "amq.direct",
            "routingKey": "nowhere",
            "body": "lost",
            "messageId": "r1",
        }
    ]
    # deliveries seen after each step: prefetch 2 holds the window at two unacked
    assert out["steps"] == [2, 3, 4, 5, 7, 9, 9]
    assert out["nackRedelivered"] == ["m1", True]
    assert sorted(out["recovered"]) == [["m1", True], ["m3", True]]
    assert out["order"][:5] == ["m0", "m1", "m2", "m1", "m3"]
    assert out["order"][7:] == ["m4", "m5"]
    assert [b for b, _, _ in drain(tenant, q)] == [f"c{i}".encode() for i in range(20)]
    assert [b for b, _, _ in drain(tenant, q2)] == [b"m4", b"m5", b"m6"]


@pytest.mark.timeout(120)
def test_node_bodies_from_empty_to_10_mib(proxy, tenant, queues):
    q = queues.declare(tenant)
    out = node(
        "bodies",
        {**conn_args(tenant, proxy.host, proxy.port), "q": q, "sizes": BODY_SIZES},
        timeout=100,
    )
    want = [[s, _sha(body_of(s, i))] for i, s in enumerate(BODY_SIZES)]
    assert out["frameMax"] == 131072
    assert out["get"] == want
    assert out["deliver"] == want


def test_node_frame_max_4096_gets_and_consumes_1_mib(proxy, tenant, queues):
    q, q_ref = queues.declare(tenant), queues.declare(tenant)
    big = body_of(MIB, 2)
    raw_publish(tenant, q_ref, {}, body=big, count=2)
    out = node(
        "bodies",
        {
            **conn_args(tenant, proxy.host, proxy.port),
            "q": q,
            "q_ref": q_ref,
            "sizes": [0, 1, 4088, 4089, MIB],
            "frameMax": 4096,
        },
    )
    assert out["frameMax"] == 4096
    assert out["refGet"] == out["refDeliver"] == [MIB, _sha(big)]
    want = [[s, _sha(body_of(s, i))] for i, s in enumerate([0, 1, 4088, 4089, MIB])]
    assert out["get"] == want and out["deliver"] == want


def test_node_exchanges_reply_to_broker_cancel_user_id(proxy, tenant, queues):
    qs = {k: queues.declare(tenant) for k in ("q_topic", "q_fan", "q_hdr", "rpc_q", "doomed")}
    out = node(
        "routing", {**conn_args(tenant, proxy.host, proxy.port), **qs, "tag": uuid.uuid4().hex[:6]}
    )
    assert out["rpc"] == ["HELLO", "rpc-7"]
    assert out["cancel"] == "cancelled" and out["cancelChannelOpen"] is True
    assert "406" in out["userIdError"] and "user_id" in out["userIdError"]
    assert out["connectionAlive"] is True
    got = {k: [b for b, _, _ in drain(tenant, qs[k])] for k in ("q_topic", "q_fan", "q_hdr")}
    assert got == {"q_topic": [b"abc"], "q_fan": [b"e2e", b"after"], "q_hdr": [b"h-yes"]}
