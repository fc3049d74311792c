"""php-amqplib (Debian php-amqplib; tests/clients/php/driver.php run as a subprocess) through the
proxy against the real broker. php-amqplib logs in with AMQPLAIN by default (PLAIN is used too).
It cannot ask for a smaller frame_max (it takes the server's Tune): frame_max 4096 is covered by
pika, Node and the raw client."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from clientlib import (
    BODY_SIZES,
    BROKER_HOST,
    BROKER_PORT,
    REF_TIMESTAMP,
    UPSTREAM_CONNECTIONS,
    UPSTREAM_CONNECTS,
    body_of,
    conn_args,
    drain,
    php,
    queue_counts,
    raw_get,
    raw_publish,
    reference_properties,
    wait_for,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("need_php")]


def typed_json(tv):
    """The reference typed table in the driver's JSON form ([tag, value], bytes as hex)."""
    if isinstance(tv, dict):
        return {k: typed_json(v) for k, v in tv.items()}
    tag, v = tv
    if tag == "F":
        return [tag, {k: typed_json(x) for k, x in v.items()}]
    if tag == "A":
        return [tag, [typed_json(x) for x in v]]
    if tag == "x":
        return [tag, v.hex()]
    if tag == "D":
        return [tag, list(v)]
    return [tag, v]


@pytest.mark.parametrize("login", ["AMQPLAIN", "PLAIN"])
def test_php_properties_and_header_types_round_trip(proxy, tenant, queues, login):
    expected = reference_properties(tenant.user)
    runs = {}
    for name, host, port in (
        ("direct", BROKER_HOST, BROKER_PORT),
        ("proxy", proxy.host, proxy.port),
    ):
        q_in, q_out = queues.declare(tenant), queues.declare(tenant)
        raw_publish(tenant, q_in, expected, body=b"ref", count=2)
        seen = php(
            "props", {**conn_args(tenant, host, port), "login": login, "q_in": q_in, "q_out": q_out}
        )
        runs[name] = (seen, wait_for(lambda q=q_out: raw_get(tenant, q), 5))
    (direct_seen, direct_out), (seen, out) = runs["direct"], runs["proxy"]

    assert seen == direct_seen
    want = {k: v for k, v in expected.items() if k != "headers"}
    want["application_headers"] = typed_json(expected["headers"])
    for how in ("get", "deliver"):
        assert seen[how]["body"] == "ref"
        assert seen[how]["properties"] == want  # every property, every tag and value

    assert out.properties_raw == direct_out.properties_raw
    p = out.properties
    assert out.body == b"out"
    assert {k: v for k, v in p.items() if k != "headers"} == {
        "content_type": "text/plain",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "priority": 6,
        "correlation_id": "c",
        "reply_to": "r",
        "expiration": "20000",
        "message_id": "m",
        "timestamp": REF_TIMESTAMP,
        "type": "t",
        "user_id": tenant.user,
        "app_id": "php",
    }
    assert p["headers"] == {
        "str": ("S", "ph\u00e9"),
        "i8": ("b", -5),
        "i16": ("s", -300),
        "i32": ("I", -70000),
        "i64": ("l", -5000000000),
        "auto": ("I", 70000),
        "dec": ("D", (2, 12345)),
        "ts": ("T", REF_TIMESTAMP),
        "yes": ("t", True),
        "no": ("t", False),
        "bytes": ("x", b"\x00\x01\xfe\xff"),
        "void": ("V", None),
        "table": ("F", {"k": ("S", "v"), "inner": ("F", {"deep": ("t", True)})}),
        "array": ("A", [("S", "a"), ("I", 1), ("A", [("t", True)])]),
    }


def test_php_confirms_return_tx_qos_ack_nack_reject_recover_cancel(proxy, tenant, queues):
    q, q2 = queues.declare(tenant), queues.declare(tenant)
    out = php("features", {**conn_args(tenant, proxy.host, proxy.port), "q": q, "q2": q2})
    assert (out["acks"], out["nacks"]) == (21, 0)  # the returned message is acked too
    assert out["returns"] == [[312, "NO_ROUTE", "amq.direct", "nowhere", "lost", "r1"]]
    assert out["countAfterCommit"] == 21
    assert out["steps"] == [2, 3, 4, 5, 7, 9, 9]
    assert out["nackRedelivered"] == ["m1", True]
    assert sorted(out["recovered"]) == [["m1", True], ["m3", True]]
    assert out["order"][:5] == ["m0", "m1", "m2", "m1", "m3"] and out["order"][7:] == ["m4", "m5"]
    assert [b for b, _, _ in drain(tenant, q)] == [f"c{i}".encode() for i in range(20)] + [
        b"committed"
    ]
    assert [b for b, _, _ in drain(tenant, q2)] == [b"m4", b"m5", b"m6"]


@pytest.mark.timeout(120)
def test_php_bodies_from_empty_to_10_mib(proxy, tenant, queues):
    q = queues.declare(tenant)
    out = php(
        "bodies",
        {**conn_args(tenant, proxy.host, proxy.port), "q": q, "sizes": BODY_SIZES},
        timeout=100,
    )
    want = [[s, hashlib.sha256(body_of(s, i)).hexdigest()] for i, s in enumerate(BODY_SIZES)]
    assert out["get"] == want
    assert out["deliver"] == want


def test_php_exchanges_reply_to_broker_cancel_user_id_channel_ids(proxy, tenant, queues):
    qs = {
        k: queues.declare(tenant) for k in ("q_topic", "q_fan", "q_hdr", "rpc_q", "doomed", "q_ids")
    }
    out = php(
        "routing", {**conn_args(tenant, proxy.host, proxy.port), **qs, "tag": uuid.uuid4().hex[:6]}
    )
    assert out["channelId"] == 2047
    assert out["rpc"] == ["cpr-php", "id-9"]
    assert out["cancel"] == "cancelled" and out["cancelChannelOpen"] is True
    code, text = out["userIdError"]
    assert code == 406 and "user_id" in text
    assert out["channels"] == [2, 500, 2046]
    assert out["connectionAlive"] is True
    got = {
        k: [b for b, _, _ in drain(tenant, qs[k])] for k in ("q_topic", "q_fan", "q_hdr", "q_ids")
    }
    # One publish on each of three channels, closed in turn: the proxy answers each close at
    # once, so the broker may take the three in any order (README, limitations).
    got["q_ids"].sort()
    assert got == {
        "q_topic": [b"one.end"],
        "q_fan": [b"fan.x", b"after"],
        "q_hdr": [b"hx"],
        "q_ids": [b"ch-2", b"ch-2046", b"ch-500"],
    }


@pytest.mark.timeout(150)
def test_php_process_per_message_50_times_one_upstream_connection(proxy, tenant, queues):
    """The PHP-FPM pattern the proxy exists for: a new php process per message. All 50 arrive,
    in order, over a single upstream connection for the tenant."""
    q = queues.declare(tenant)
    before = proxy.metric(UPSTREAM_CONNECTS, **tenant.labels)
    for i in range(50):
        assert php(
            "publish_one",
            {**conn_args(tenant, proxy.host, proxy.port), "q": q, "body": f"php-{i}"},
            timeout=20,
        ) == {"ok": True}
    wait_for(lambda: queue_counts(tenant, q)[0] >= 50, 5)
    assert [b for b, _, _ in drain(tenant, q)] == [f"php-{i}".encode() for i in range(50)]
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) - before == 1
    assert proxy.metric(UPSTREAM_CONNECTIONS, **tenant.labels) == 1
