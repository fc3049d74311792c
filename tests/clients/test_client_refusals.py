"""A refused login looks the same to every client library through the proxy as on a direct
connection: a wrong password is refused in reply to Connection.StartOk (403, before Tune), a
vhost the user may not use at Connection.Open (530) — so each library reports what it reports
for RabbitMQ itself (Node amqplib says ACCESS_REFUSED, not "Expected ConnectionOpenOk")."""

from __future__ import annotations

import dataclasses
import re

import amqp
import pika
import pytest
from clientlib import BROKER_HOST, BROKER_PORT, conn_args, node, php
from support.raw import RawAMQP, RawConnectionClose

pytestmark = pytest.mark.timeout(120)


def bad_logins(tenant, other):
    """(what is wrong, the credentials) — the broker refuses each."""
    return [
        ("password", dataclasses.replace(tenant, password="not-the-password")),
        ("user", dataclasses.replace(tenant, user="itest-no-such-user")),
        ("vhost", dataclasses.replace(tenant, vhost=other.vhost)),  # no permissions there
    ]


def normal(text: str) -> str:
    """A library's error text without what differs between two connections (ports, ids)."""
    return re.sub(r"\d+\.\d+\.\d+\.\d+:\d+|127\.0\.0\.1|\b\d{3,5}\b(?! \()", "#", text)


def pika_outcome(host: str, port: int, t) -> str:
    params = pika.ConnectionParameters(
        host, port, t.vhost, pika.PlainCredentials(t.user, t.password), connection_attempts=1
    )
    try:
        pika.BlockingConnection(params).close()
        return "admitted"
    except pika.exceptions.AMQPConnectionError as exc:
        return type(exc).__name__


def pyamqp_outcome(host: str, port: int, t) -> str:
    conn = amqp.Connection(f"{host}:{port}", userid=t.user, password=t.password,
                           virtual_host=t.vhost, connect_timeout=10)  # fmt: skip
    try:
        conn.connect()
        conn.close()
        return "admitted"
    except Exception as exc:
        return f"{type(exc).__name__} {getattr(exc, 'reply_code', '')}"


def raw_stage(host: str, port: int, t) -> tuple[str, int]:
    """At which step the Connection.Close came, and its code."""
    raw = RawAMQP(host, port)
    try:
        raw.handshake(t.user, t.password, t.vhost)
        return "admitted", 0
    except RawConnectionClose as exc:
        return ("before Tune" if raw.channel_max == 0 else "after Tune"), exc.reply_code
    finally:
        raw.abort()


@pytest.fixture
def logins(proxy, tenant, tenant_factory):
    own = tenant_factory(own_user=True)  # rights on its own vhost only
    keep = proxy.connect(own)  # a warm pool for these credentials: refusals must not use it
    yield bad_logins(own, tenant)
    keep.close()


def test_python_clients_are_refused_as_by_the_broker(proxy, logins):
    for wrong, t in logins:
        direct = (
            pika_outcome(BROKER_HOST, BROKER_PORT, t),
            pyamqp_outcome(BROKER_HOST, BROKER_PORT, t),
        )
        proxied = (
            pika_outcome(proxy.host, proxy.port, t),
            pyamqp_outcome(proxy.host, proxy.port, t),
        )
        assert "admitted" not in direct
        assert proxied == direct, wrong
        assert raw_stage(proxy.host, proxy.port, t) == raw_stage(BROKER_HOST, BROKER_PORT, t), wrong


@pytest.mark.usefixtures("need_node")
def test_node_amqplib_is_refused_as_by_the_broker(proxy, logins):
    for wrong, t in logins:
        direct = node("login", conn_args(t, BROKER_HOST, BROKER_PORT))
        proxied = node("login", conn_args(t, proxy.host, proxy.port))
        assert direct["ok"] is False
        assert normal(proxied["error"]) == normal(direct["error"]), wrong
        if wrong != "vhost":
            assert "ACCESS_REFUSED" in proxied["error"] or "403" in proxied["error"], proxied


@pytest.mark.usefixtures("need_php")
def test_php_amqplib_is_refused_as_by_the_broker(proxy, logins):
    for wrong, t in logins:
        direct = php("login", conn_args(t, BROKER_HOST, BROKER_PORT))
        proxied = php("login", conn_args(t, proxy.host, proxy.port))
        assert direct["ok"] is False
        assert normal(proxied["error"]) == normal(direct["error"]), wrong
