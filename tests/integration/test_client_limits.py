"""Bounded clients: a client that stalls in the handshake is dropped after --handshake-timeout,
a frame above the negotiated frame_max is a connection error for that client only, and neither
disturbs other clients of the pool. Client connect/disconnect is logged with its identity."""

from __future__ import annotations

import re
import socket
import time

import pytest
from pamqp import body as pbody
from pamqp import commands
from pamqp import frame as pframe
from support import UPSTREAM_CONNECTS, direct, drain, queue_counts, wait_for
from support.raw import PROTOCOL_HEADER, RawAMQP, RawClosed, RawConnectionClose


@pytest.fixture(scope="module")
def hs_proxy(module_proxy_factory):
    return module_proxy_factory("-t", "60", "--handshake-timeout", "2")


def _closed_within(sock: socket.socket, timeout: float) -> float:
    """Seconds until the peer closes (EOF/RST) the socket, reading and discarding data."""
    t0 = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - t0 < timeout:
        try:
            if not sock.recv(65536):
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0
    raise AssertionError(f"connection still open after {timeout}s")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("stage", ["nothing-sent", "after-protocol-header", "after-start-ok"])
def test_client_stalling_in_handshake_is_dropped(hs_proxy, tenant, queues, stage):
    q = queues.declare(tenant)
    s = socket.create_connection((hs_proxy.host, hs_proxy.port))
    try:
        if stage != "nothing-sent":
            s.sendall(PROTOCOL_HEADER)
        if stage == "after-start-ok":
            raw = RawAMQP.__new__(RawAMQP)
            raw.sock, raw.buf = s, b""
            raw.expect(commands.Connection.Start, 0)
            raw.send(
                0,
                commands.Connection.StartOk(
                    {}, "PLAIN", f"\0{tenant.user}\0{tenant.password}", "en_US"
                ),
            )
            raw.expect(commands.Connection.Tune, 0)
            # ... and never TuneOk / Open
        # meanwhile a normal client is served
        c = hs_proxy.connect(tenant)
        c.channel().basic_publish("", q, b"served")
        c.close()
        elapsed = _closed_within(s, 8)
        assert elapsed <= 5, f"stalled client dropped after {elapsed:.1f}s (timeout 2s)"
    finally:
        s.close()
    assert [b for b, _, _ in drain(tenant, q)] == [b"served"]


@pytest.mark.timeout(30)
def test_frame_above_frame_max_is_a_client_connection_error_only(hs_proxy, tenant, queues):
    q = queues.declare(tenant)
    bystander = hs_proxy.connect(tenant)
    bch = bystander.channel()
    bch.confirm_delivery()
    bch.basic_publish("", q, b"before")
    raw = RawAMQP(hs_proxy.host, hs_proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost, frame_max=4096)
        raw.open_channel(1)
        data = pframe.marshal(commands.Basic.Publish(exchange="", routing_key=q), 1)
        from pamqp import header as pheader

        data += pframe.marshal(pheader.ContentHeader(0, 20000, commands.Basic.Properties()), 1)
        data += pframe.marshal(pbody.ContentBody(b"B" * 20000), 1)  # one 20 kB frame > 4096
        raw.send_raw(data)
        with pytest.raises((RawConnectionClose, RawClosed)) as ei:
            raw.read_until(lambda c, v: False, timeout=5)
        if isinstance(ei.value, RawConnectionClose):
            assert ei.value.reply_code == 501, ei.value  # FRAME_ERROR
    finally:
        raw.abort()
    bch.basic_publish("", q, b"after")
    bystander.close()
    assert [b for b, _, _ in drain(tenant, q)] == [b"before", b"after"]
    assert hs_proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1


@pytest.mark.timeout(30)
def test_client_connect_and_disconnect_are_logged_with_identity(hs_proxy, tenant):
    name = f"itest-named-{tenant.user[-8:]}"
    c = hs_proxy.connect(tenant, client_properties={"connection_name": name})
    # the client port, as the proxy sees it
    local_port = c._impl._transport._sock.getsockname()[1]
    c.channel()
    c.close()

    def lines_for_client():
        return [ln for ln in hs_proxy.log().splitlines() if re.search(rf":{local_port}\b", ln)]

    wait_for(
        lambda: len(lines_for_client()) >= 2,
        3,
        message=lambda: f"connect/disconnect lines for port {local_port}: {lines_for_client()}",
    )
    text = "\n".join(lines_for_client())
    assert tenant.user in text and tenant.vhost in text, text
    assert name in text, f"connection_name {name!r} not logged:\n{text}"
    assert "INFO" in text


@pytest.mark.timeout(30)
def test_channel_id_above_channel_max_is_refused(hs_proxy, tenant):
    raw = RawAMQP(hs_proxy.host, hs_proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost, channel_max=5)
        assert raw.channel_max == 5
        raw.open_channel(5)
        raw.send(6, commands.Channel.Open())
        with pytest.raises((RawConnectionClose, RawClosed)) as ei:
            raw.read_until(
                lambda c, v: isinstance(v, commands.Channel.OpenOk) and c == 6, timeout=5
            )
        if isinstance(ei.value, RawConnectionClose):
            assert 500 <= ei.value.reply_code < 600, ei.value
    finally:
        raw.abort()


@pytest.mark.timeout(60)
def test_client_that_stops_reading_does_not_stall_others_on_its_upstream(
    proxy_factory, tenant, queues
):
    """A consumer that never reads its socket while the broker pushes ~20 MiB at it must not
    stall confirms for another client of the same pool (DESIGN 2.5: one slow client cannot
    stall the others). Both on one upstream connection, as without the split (which would put
    the consumer apart): the proxy itself must keep it from stalling the other."""
    hs_proxy = proxy_factory("-t", "60", "--no-split-consumers")
    q_big = queues.declare(tenant)
    q_small = queues.declare(tenant)
    chunk = b"s" * (64 * 1024)
    with direct(tenant) as ch:
        for _ in range(320):
            ch.basic_publish("", q_big, chunk)
    wait_for(lambda: queue_counts(tenant, q_big)[0] == 320, 10)

    other = hs_proxy.connect(tenant)  # same pool: shares the upstream connection
    och = other.channel()
    och.confirm_delivery()
    och.basic_publish("", q_small, b"warm")

    slow = RawAMQP(hs_proxy.host, hs_proxy.port)
    try:
        slow.handshake(tenant.user, tenant.password, tenant.vhost)
        slow.open_channel(1)
        slow.send(1, commands.Basic.Consume(queue=q_big, no_ack=True))
        time.sleep(1.0)  # broker pushes; nobody reads on the slow side
        assert hs_proxy.metric("amqproxy_upstream_connections", **tenant.labels) == 1
        for i in range(5):
            t0 = time.monotonic()
            och.basic_publish("", q_small, f"m{i}".encode())  # waits for the confirm
            took = time.monotonic() - t0
            assert took < 2.0, f"confirm {i} took {took:.1f}s: stalled by the slow consumer"
    finally:
        slow.abort()
        other.close()
