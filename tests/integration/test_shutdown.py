"""Graceful shutdown: SIGTERM stops the listener, lets clients finish for
--term-client-close-timeout, then sends them Connection.Close 320 and exits 0."""

from __future__ import annotations

import signal
import socket
import time

import pika
import pytest
from support import drain, list_connections, wait_for
from support.raw import PROTOCOL_HEADER


def _not_accepting(proxy) -> bool:
    """True if a new client can no longer start an AMQP session on the listen port."""
    try:
        s = socket.create_connection((proxy.host, proxy.port), timeout=0.3)
    except OSError:
        return True  # refused: listener closed
    try:
        s.settimeout(0.5)
        s.sendall(PROTOCOL_HEADER)
        data = s.recv(7)
        return not data  # closed without a Connection.Start
    except OSError:
        return True
    finally:
        s.close()


def _tenant_upstreams(tenant):
    return [
        r
        for r in list_connections("vhost", "client_properties")
        if r.get("vhost") == tenant.vhost and "itest-direct" not in r.get("client_properties", "")
    ]


@pytest.mark.timeout(40)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_clients_then_closes_them_with_320_and_exits_0(
    proxy_factory, tenant, queues, sig
):
    grace, term = 2.0, 5.0
    p = proxy_factory(
        "-t", "60", "--term-client-close-timeout", str(grace), "--term-timeout", str(term)
    )
    q = queues.declare(tenant)
    c = p.connect(tenant)
    ch = c.channel()
    ch.confirm_delivery()
    ch.basic_publish("", q, b"before")

    t0 = time.monotonic()
    p.send_signal(sig)
    wait_for(
        lambda: _not_accepting(p),
        1.0,
        interval=0.05,
        message="listener still accepts new clients after the signal",
    )
    # the connected client can keep working during the grace period
    ch.basic_publish("", q, b"during-drain")

    exc = None
    while time.monotonic() - t0 < grace + term:
        try:
            c.process_data_events(time_limit=0.05)
        except Exception as e:
            exc = e
            break
    told = time.monotonic() - t0
    assert isinstance(exc, pika.exceptions.ConnectionClosedByBroker), repr(exc)
    assert exc.reply_code == 320
    assert grace - 0.5 <= told <= grace + 1.5, f"client told after {told:.2f}s (grace {grace}s)"

    rc = p.wait_exit(timeout=grace + term + 3)
    assert rc == 0, f"exit code {rc}"
    assert time.monotonic() - t0 <= grace + term + 2
    assert [b for b, _, _ in drain(tenant, q)] == [b"before", b"during-drain"]
    wait_for(
        lambda: not _tenant_upstreams(tenant),
        5,
        interval=0.3,
        message="upstream connections still open on the broker after exit",
    )


@pytest.mark.timeout(30)
def test_sigterm_without_clients_exits_promptly_and_closes_upstreams(proxy_factory, tenant):
    p = proxy_factory("-t", "60", "--term-client-close-timeout", "10", "--term-timeout", "10")
    c = p.connect(tenant)
    c.channel()
    c.close()  # leaves a parked channel and an idle upstream
    assert len(_tenant_upstreams(tenant)) == 1
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc = p.wait_exit(timeout=15)
    assert rc == 0
    assert time.monotonic() - t0 < 3, "waited for clients although none were connected"
    wait_for(lambda: not _tenant_upstreams(tenant), 5, interval=0.3)


@pytest.mark.timeout(30)
def test_sigterm_exits_as_soon_as_the_last_client_leaves(proxy_factory, tenant):
    p = proxy_factory("-t", "60", "--term-client-close-timeout", "20", "--term-timeout", "20")
    c = p.connect(tenant)
    c.channel()
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    c.sleep(0.5)
    c.close()
    rc = p.wait_exit(timeout=25)
    assert rc == 0
    assert time.monotonic() - t0 < 4, "kept waiting after the last client left"


@pytest.mark.timeout(30)
def test_second_signal_exits_at_once(proxy_factory, tenant):
    p = proxy_factory("-t", "60", "--term-client-close-timeout", "30", "--term-timeout", "30")
    c = p.connect(tenant)
    c.channel()
    p.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert p.alive, "exited before the grace period although a client is connected"
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    p.wait_exit(timeout=5)
    assert time.monotonic() - t0 < 2
    with pytest.raises(Exception):  # noqa: B017 - the proxy is gone, however pika reports it
        c.process_data_events(time_limit=1)
        c.channel()
