"""Whole messages only: a client that dies in the middle of a large message leaves no trace
upstream, and clients sharing its pool (its upstream connection) are unaffected."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from pamqp import commands
from support import UPSTREAM_CONNECTS, drain, queue_counts, wait_for
from support.raw import RawAMQP

BIG = 1024 * 1024


def _partial_message(raw: RawAMQP, queue: str, cut: str) -> tuple[bytes, bytes]:
    """(bytes sent before vanishing, the rest) of a 1 MiB publish on channel 1."""
    full = raw.content_frames(1, "", queue, b"X" * BIG)
    # method frame + header frame + k body frames
    pos = 0
    boundaries = []
    while pos < len(full):
        size = struct.unpack_from(">I", full, pos + 3)[0]
        pos += 7 + size + 1
        boundaries.append(pos)
    assert len(boundaries) >= 6, "expected several body frames"
    if cut == "frame-boundary":
        at = boundaries[4]  # publish, header, 3 body frames
    else:
        at = boundaries[4] + 1000  # in the middle of the 4th body frame
    return full[:at], full[at:]


def _vanish(raw: RawAMQP, how: str) -> None:
    if how == "rst":
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.abort()


@pytest.mark.timeout(40)
@pytest.mark.parametrize(
    "cut,how", [("frame-boundary", "fin"), ("mid-frame", "rst")], ids=["boundary-fin", "mid-rst"]
)
def test_client_vanishing_mid_message_leaves_nothing_and_bystander_keeps_working(
    proxy, tenant, queues, cut, how
):
    q = queues.declare(tenant)
    bystander = proxy.connect(tenant)
    bch = bystander.channel()
    bch.confirm_delivery()
    expected = []

    def by_publish(i: int) -> None:
        body = f"by-{i}".encode()
        bch.basic_publish("", q, body)  # confirmed: raises if nacked/closed
        expected.append(body)

    for i in range(5):
        by_publish(i)

    raw = RawAMQP(proxy.host, proxy.port)
    raw.handshake(tenant.user, tenant.password, tenant.vhost)
    raw.open_channel(1)
    sent, _rest = _partial_message(raw, q, cut)
    raw.send_raw(sent)
    time.sleep(0.2)
    for i in range(5, 10):  # while the big message is half-sent on the same pool
        by_publish(i)
    _vanish(raw, how)
    time.sleep(0.2)
    for i in range(10, 15):
        by_publish(i)
    bystander.close()
    # later short-lived clients of the pool (they may get the vanished client's channel)
    for i in range(15, 20):
        c = proxy.connect(tenant)
        ch = c.channel()
        ch.confirm_delivery()
        ch.basic_publish("", q, f"by-{i}".encode())
        expected.append(f"by-{i}".encode())
        c.close()

    wait_for(lambda: queue_counts(tenant, q)[0] >= len(expected), 5)
    time.sleep(0.3)
    bodies = [b for b, _, _ in drain(tenant, q)]
    assert not any(len(b) == BIG for b in bodies), "the incomplete message reached the queue"
    assert bodies == expected
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1, (
        "the shared upstream connection was lost (half a content sequence forwarded?)"
    )


@pytest.mark.timeout(40)
def test_slowly_completed_large_message_arrives_once_and_intact(proxy, tenant, queues):
    q = queues.declare(tenant)
    bystander = proxy.connect(tenant)
    bch = bystander.channel()
    bch.confirm_delivery()
    raw = RawAMQP(proxy.host, proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost)
        raw.open_channel(1)
        raw.rpc(1, commands.Confirm.Select(), commands.Confirm.SelectOk)
        sent, rest = _partial_message(raw, q, "mid-frame")
        raw.send_raw(sent)
        bch.basic_publish("", q, b"by-0")
        time.sleep(0.3)
        bch.basic_publish("", q, b"by-1")
        mid = len(rest) // 2
        raw.send_raw(rest[:mid])
        time.sleep(0.3)
        raw.send_raw(rest[mid:])
        ack = raw.expect(commands.Basic.Ack, 1, timeout=5)
        assert ack.delivery_tag == 1
    finally:
        raw.close()
    bystander.close()
    wait_for(lambda: queue_counts(tenant, q)[0] == 3, 5)
    bodies = [b for b, _, _ in drain(tenant, q)]
    assert sorted(bodies, key=len) == [b"by-0", b"by-1", b"X" * BIG]
