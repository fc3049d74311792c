"""Idle upstream connections are closed after --idle-connection-timeout seconds without use,
measured from the last use (not "no channels at the moment of a sweep")."""

from __future__ import annotations

import time

import pytest
from support import (
    PARKED_CHANNELS,
    UPSTREAM_CONNECTIONS,
    UPSTREAM_CONNECTS,
    list_connections,
    queue_counts,
    wait_for,
)


@pytest.fixture(scope="module")
def idle_proxy(module_proxy_factory):
    return module_proxy_factory("-t", "1")


def _broker_upstreams(tenant):
    return [
        r
        for r in list_connections("vhost", "client_properties")
        if r.get("vhost") == tenant.vhost and "itest-direct" not in r.get("client_properties", "")
    ]


@pytest.mark.timeout(30)
def test_idle_upstream_closed_after_timeout(idle_proxy, tenant, queues):
    p = idle_proxy
    q = queues.declare(tenant)
    c = p.connect(tenant)
    c.channel().basic_publish("", q, b"x")
    c.close()
    t_left = time.monotonic()
    assert p.metric(UPSTREAM_CONNECTIONS, **tenant.labels) == 1
    p.wait_metric(UPSTREAM_CONNECTIONS, 0, timeout=5, **tenant.labels)
    elapsed = time.monotonic() - t_left
    assert 0.8 <= elapsed <= 3.5, f"idle upstream closed after {elapsed:.2f}s with -t 1"
    assert p.metric(PARKED_CHANNELS, **tenant.labels) == 0
    wait_for(
        lambda: not _broker_upstreams(tenant),
        5,
        interval=0.3,
        message="the broker still lists the proxy's upstream connection",
    )
    # and a later client gets a fresh one
    c = p.connect(tenant)
    c.channel().basic_publish("", q, b"y")
    c.close()
    assert p.metric(UPSTREAM_CONNECTS, **tenant.labels) == 2
    wait_for(lambda: queue_counts(tenant, q)[0] == 2, 5)


@pytest.mark.timeout(30)
def test_upstream_in_use_is_not_closed(idle_proxy, tenant, queues):
    """A connected client with a channel keeps its upstream even when quiet for > timeout."""
    p = idle_proxy
    q = queues.declare(tenant)
    c = p.connect(tenant)
    ch = c.channel()
    ch.basic_publish("", q, b"a")
    c.sleep(3)
    ch.basic_publish("", q, b"b")
    c.close()
    assert p.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1
    wait_for(lambda: queue_counts(tenant, q)[0] == 2, 5)


@pytest.mark.timeout(30)
def test_idle_time_counts_from_last_use(idle_proxy, tenant, queues):
    """Short-lived clients every 0.4 s for 4 s: the upstream is never idle for 1 s, so it is
    never closed, even though between clients it has no leased channel."""
    p = idle_proxy
    q = queues.declare(tenant)
    t_end = time.monotonic() + 4
    n = 0
    while time.monotonic() < t_end:
        c = p.connect(tenant)
        c.channel().basic_publish("", q, b"tick")
        c.close()
        n += 1
        time.sleep(0.4)
    assert p.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1, "upstream closed while in use"
    wait_for(lambda: queue_counts(tenant, q)[0] == n, 5)
