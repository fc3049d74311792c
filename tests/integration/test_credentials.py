"""Credentials are bytes from the client's StartOk to the proxy's upstream StartOk and in the
pool key: a client is admitted exactly when the broker would admit those bytes, cold or warm."""

from __future__ import annotations

import struct

import pytest
from support import BROKER_HOST, BROKER_PORT, UPSTREAM_CONNECTIONS
from support.raw import RawAMQP, RawClosed, RawConnectionClose

REPLACEMENT = "\ufffd"  # what a decoder with errors="replace" makes of b"\xff"


def amqplain(user: bytes, password: bytes) -> bytes:
    return b"".join(
        bytes([len(k)]) + k + b"S" + struct.pack(">I", len(v)) + v
        for k, v in ((b"LOGIN", user), (b"PASSWORD", password))
    )


def attempt(host: str, port: int, tenant, mechanism: str, response: bytes) -> str:
    """'admitted', or how the server refused: 'close <code>' or 'reset'."""
    raw = RawAMQP(host, port)
    try:
        raw.handshake(tenant.user, "-", tenant.vhost, mechanism=mechanism, response=response)
        raw.open_channel(1)
        return "admitted"
    except RawConnectionClose as exc:
        return f"close {exc.reply_code}"
    except (RawClosed, ConnectionError):
        return "reset"
    finally:
        raw.abort()


def refused(outcome: str) -> bool:
    return outcome != "admitted"


@pytest.fixture
def odd_user(tenant_factory):
    """A user whose password contains U+FFFD (valid UTF-8: b"\\xef\\xbf\\xbd")."""
    return tenant_factory(own_user=True, password=f"s{REPLACEMENT}cret-91")


def plain(user: str, password: bytes) -> bytes:
    return b"\x00" + user.encode() + b"\x00" + password


@pytest.mark.timeout(60)
def test_invalid_utf8_password_is_not_its_replacement(proxy_factory, odd_user):
    """The broker's password is s\\ufffdcret-91; a client sending b"s\\xffcret-91" is refused
    by the broker, and by the proxy with a cold pool and with a warm one."""
    p = proxy_factory("-t", "60")
    right = odd_user.password.encode()
    wrong = right.replace(REPLACEMENT.encode(), b"\xff")
    for mechanism, make in (("PLAIN", plain), ("AMQPLAIN", lambda u, pw: amqplain(u.encode(), pw))):
        assert refused(
            attempt(BROKER_HOST, BROKER_PORT, odd_user, mechanism, make(odd_user.user, wrong))
        )
        assert (
            attempt(BROKER_HOST, BROKER_PORT, odd_user, mechanism, make(odd_user.user, right))
            == "admitted"
        )
        # cold: no pool yet for these credentials
        assert (
            attempt(p.host, p.port, odd_user, mechanism, make(odd_user.user, wrong)) == "close 403"
        )
        # warm: a client with the right bytes holds the pool open
        keep = RawAMQP(p.host, p.port)
        keep.handshake(odd_user.user, odd_user.password, odd_user.vhost, mechanism=mechanism)
        keep.open_channel(1)
        try:
            assert (
                attempt(p.host, p.port, odd_user, mechanism, make(odd_user.user, wrong))
                == "close 403"
            )
            assert (
                attempt(p.host, p.port, odd_user, mechanism, make(odd_user.user, right))
                == "admitted"
            )
        finally:
            keep.close()
    assert p.metric(UPSTREAM_CONNECTIONS, user=odd_user.user) <= 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "response",
    [
        pytest.param(lambda t: t.user.encode() + plain(t.user, t.password.encode()), id="authzid"),
        pytest.param(lambda t: plain(t.user, t.password.encode()) + b"\x00x", id="nul-in-password"),
        pytest.param(lambda t: t.user.encode() + b"\x00" + t.password.encode(), id="two-fields"),
    ],
)
def test_plain_responses_the_broker_refuses_are_refused_with_a_warm_pool(
    proxy, tenant_factory, response
):
    tenant = tenant_factory(own_user=True)
    bytes_ = response(tenant)
    assert refused(attempt(BROKER_HOST, BROKER_PORT, tenant, "PLAIN", bytes_))
    keep = RawAMQP(proxy.host, proxy.port)
    keep.handshake(tenant.user, tenant.password, tenant.vhost)
    try:
        assert attempt(proxy.host, proxy.port, tenant, "PLAIN", bytes_) == "close 403"
    finally:
        keep.close()


@pytest.mark.timeout(60)
def test_amqplain_password_with_a_nul_is_another_password(proxy, tenant_factory):
    """PLAIN cannot carry a NUL, AMQPLAIN can: "pw" + NUL + "x" is not "pw" for the broker, nor
    for the proxy's warm pool of "pw"."""
    tenant = tenant_factory(own_user=True)
    right = tenant.password.encode()
    nul = amqplain(tenant.user.encode(), right + b"\x00x")
    assert refused(attempt(BROKER_HOST, BROKER_PORT, tenant, "AMQPLAIN", nul))
    keep = RawAMQP(proxy.host, proxy.port)
    keep.handshake(tenant.user, tenant.password, tenant.vhost, mechanism="AMQPLAIN")
    try:
        assert attempt(proxy.host, proxy.port, tenant, "AMQPLAIN", nul) == "close 403"
        assert (
            attempt(
                proxy.host, proxy.port, tenant, "AMQPLAIN", amqplain(tenant.user.encode(), right)
            )
            == "admitted"
        )
    finally:
        keep.close()


@pytest.mark.timeout(60)
def test_a_vhost_that_is_not_utf8_gets_the_brokers_answer(proxy, tenant):
    def open_with(host: str, port: int) -> str:
        raw = RawAMQP(host, port)
        try:
            raw.handshake(tenant.user, tenant.password, vhost_bytes=b"/\xff")
            return "admitted"
        except RawConnectionClose as exc:
            return f"close {exc.reply_code}"
        finally:
            raw.abort()

    assert open_with(BROKER_HOST, BROKER_PORT) == "close 501"
    assert open_with(proxy.host, proxy.port) == "close 501"
