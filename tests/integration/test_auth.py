"""Authentication happens before Connection.OpenOk, against the broker, even with a warm pool;
pools are keyed by (user, password, vhost) and never mix tenants."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import aio_pika
import pika
import pytest
from support import (
    CLIENT_CONNECTIONS,
    UPSTREAM_CONNECTIONS,
    UPSTREAM_CONNECTS,
    drain,
    list_connections,
    reply_code_of,
)
from support.raw import RawAMQP, RawConnectionClose


def _warm_pool(proxy, tenant, queue):
    """One client connected with an open channel, and one parked channel left by another."""
    keep = proxy.connect(tenant)
    kch = keep.channel()
    kch.basic_publish("", queue, b"warm-1")
    c = proxy.connect(tenant)
    c.channel().basic_publish("", queue, b"warm-2")
    c.close()
    assert proxy.metric(UPSTREAM_CONNECTIONS, **tenant.labels) == 1
    return keep, kch


def _bad_login(kind, tenant, other):
    if kind == "wrong-password":
        return dict(user=tenant.user, password="not-the-password", vhost=tenant.vhost), 403
    if kind == "unknown-user":
        return dict(user="itest-no-such-user", password=tenant.password, vhost=tenant.vhost), 403
    if kind == "missing-vhost":
        return dict(user=tenant.user, password=tenant.password, vhost="itest-no-such-vhost"), 530
    if kind == "forbidden-vhost":  # exists, but tenant.user has no permissions there
        return dict(user=tenant.user, password=tenant.password, vhost=other.vhost), 530
    raise AssertionError(kind)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "kind", ["wrong-password", "unknown-user", "missing-vhost", "forbidden-vhost"]
)
def test_bad_login_refused_at_connect_while_pool_is_warm(
    proxy, tenant, tenant_factory, queues, kind
):
    other = None
    if kind == "forbidden-vhost":
        # a user with rights on its own vhost only; `other` is a vhost it may not use
        other, tenant = tenant, tenant_factory(own_user=True)
    q = queues.declare(tenant)
    keep, kch = _warm_pool(proxy, tenant, q)
    creds, code = _bad_login(kind, tenant, other)

    for attempt in range(3):  # repeated failures are refused every time
        t0 = time.monotonic()
        with pytest.raises(pika.exceptions.AMQPConnectionError) as ei:
            conn = proxy.connect(**creds)
            # only reached if the proxy answered OpenOk: make the failure explicit
            conn.close()
        elapsed = time.monotonic() - t0
        assert reply_code_of(ei.value) == code, f"attempt {attempt}: {ei.value!r}"
        assert elapsed < 5, f"refusal took {elapsed:.1f}s"

    # the same refusal, seen at the frame level: Connection.Close with the broker's text
    raw = RawAMQP(proxy.host, proxy.port)
    try:
        with pytest.raises(RawConnectionClose) as rei:
            raw.handshake(**creds)
        assert rei.value.reply_code == code
        expected_text = "ACCESS_REFUSED" if code == 403 else "NOT_ALLOWED"
        assert expected_text in rei.value.reply_text
    finally:
        raw.abort()

    # the warm connection is untouched, and a new good client gets the pooled upstream
    kch.basic_publish("", q, b"still-working")
    keep.close()
    good = proxy.connect(tenant)
    good.channel().basic_publish("", q, b"good-after")
    good.close()
    bodies = [b for b, _, _ in drain(tenant, q)]
    assert bodies == [b"warm-1", b"warm-2", b"still-working", b"good-after"]
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1

    # failed credentials leave no pool and no client behind
    user, vhost = creds["user"], creds["vhost"]
    if (user, vhost) != (tenant.user, tenant.vhost):
        proxy.wait_metric(UPSTREAM_CONNECTIONS, 0, user=user, vhost=vhost)
        proxy.wait_metric(CLIENT_CONNECTIONS, 0, user=user, vhost=vhost)
    proxy.wait_metric(UPSTREAM_CONNECTIONS, 1, **tenant.labels)
    broker_side = [
        c
        for c in list_connections("user", "vhost", "client_properties")
        if c.get("user") == user and "itest-direct" not in c.get("client_properties", "")
    ]
    expected = 1 if user == tenant.user else 0
    on_tenant = [c for c in broker_side if c.get("vhost") in (tenant.vhost, vhost)]
    assert len(on_tenant) == expected, f"upstream connections for {user}: {on_tenant}"


@pytest.mark.timeout(40)
def test_aio_pika_wrong_password_refused_and_good_client_works(proxy, tenant, queues):
    q = queues.declare(tenant)

    async def run() -> None:
        good = await aio_pika.connect(proxy.url(tenant), timeout=10)
        ch = await good.channel()
        await ch.default_exchange.publish(aio_pika.Message(b"one"), q)
        bad_url = proxy.url(user=tenant.user, password="wrong", vhost=tenant.vhost)
        t0 = time.monotonic()
        with pytest.raises(Exception) as ei:
            conn = await aio_pika.connect(bad_url, timeout=10)
            await conn.close()
        assert time.monotonic() - t0 < 5
        assert not isinstance(ei.value, asyncio.TimeoutError), "refusal timed out (hang)"
        text = repr(ei.value)
        assert "ACCESS_REFUSED" in text or "Connection.Close" in text, text
        await ch.default_exchange.publish(aio_pika.Message(b"two"), q)
        await good.close()

    asyncio.run(run())
    assert [b for b, _, _ in drain(tenant, q)] == [b"one", b"two"]


@pytest.mark.timeout(40)
def test_pools_never_mix_users(proxy, tenant, tenant_factory, queues):
    """Two users in one vhost: each publishes with user_id=<itself>, which RabbitMQ only accepts
    on a connection authenticated as that user (else 406). Alternate so both pools hold
    parked channels."""
    other = tenant_factory(vhost=tenant.vhost)
    q = queues.declare(tenant)
    for i in range(6):
        t = tenant if i % 2 == 0 else other
        conn = proxy.connect(t)
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", q, f"{t.user}-{i}".encode(), pika.BasicProperties(user_id=t.user))
        conn.close()
    msgs = drain(tenant, q)
    assert [(b, p.user_id) for b, _, p in msgs] == [
        (
            f"{(tenant if i % 2 == 0 else other).user}-{i}".encode(),
            (tenant if i % 2 == 0 else other).user,
        )
        for i in range(6)
    ]
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1
    assert proxy.metric(UPSTREAM_CONNECTS, **other.labels) == 1


@pytest.mark.timeout(60)
def test_pool_is_keyed_by_password(proxy_factory, private_node, node_user, queues):
    """After the password changes on the broker, the new password gets its own pool (on a
    node of the test run's own: passwords change nowhere on the shared broker)."""
    tenant = node_user()
    p = proxy_factory(upstream=private_node.url)
    q = queues.declare(tenant)
    c = p.connect(tenant)
    c.channel().basic_publish("", q, b"old-pw")
    c.close()
    new_pw = tenant.password + "-new"
    private_node.ctl("change_password", tenant.user, new_pw)
    renewed = dataclasses.replace(tenant, password=new_pw)
    c = p.connect(renewed)
    c.channel().basic_publish("", q, b"new-pw")
    c.close()
    assert [b for b, _, _ in drain(renewed, q)] == [b"old-pw", b"new-pw"]
    # two distinct pools for the same (user, vhost): two upstream connections were opened
    assert p.metric(UPSTREAM_CONNECTS, **tenant.labels) == 2
