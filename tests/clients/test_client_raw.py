"""The raw pamqp client (tests/support/raw.py) through the proxy: the exact bytes of a
content header survive both ways, and a frame_max 4096 client gets a 1 MiB message re-split into
frames it accepts, by get and by deliver."""

from __future__ import annotations

import struct

import pytest
from clientlib import (
    MIB,
    RawAMQP,
    _read_raw_frame,
    body_of,
    encode_properties,
    raw_get,
    raw_publish,
    reference_headers,
    reference_properties,
)
from pamqp import body as pbody
from pamqp import commands
from pamqp import header as pheader

pytestmark = pytest.mark.timeout(60)


def test_raw_content_header_bytes_identical_both_ways(proxy, tenant, queues):
    """Every property and every field-table type (t b s I l f d D S T F A x V): the bytes the
    client sent are the bytes the broker stored, and the broker's bytes reach the client."""
    q = queues.declare(tenant)
    props = reference_properties(tenant.user)
    wire = encode_properties(props)
    raw_publish(tenant, q, props, body=b"x", host=proxy.host, port=proxy.port)  # via proxy
    stored = raw_get(tenant, q)  # straight from the broker
    assert stored is not None and stored.properties_raw == wire
    assert stored.properties == props
    raw_publish(tenant, q, props, body=b"y")  # straight to the broker
    got = raw_get(tenant, q, host=proxy.host, port=proxy.port)  # via proxy
    assert got is not None and got.body == b"y" and got.properties_raw == wire
    # a header-less message with no properties at all
    raw_publish(tenant, q, {}, body=b"")
    got = raw_get(tenant, q, host=proxy.host, port=proxy.port)
    assert got is not None and got.properties_raw == b"\x00\x00" and got.body == b""


def test_raw_frame_max_4096_gets_and_consumes_1_mib(proxy, tenant, queues):
    q = queues.declare(tenant)
    body = body_of(MIB, 9)
    raw_publish(tenant, q, {"headers": reference_headers()}, body=body, count=2)
    got = raw_get(tenant, q, host=proxy.host, port=proxy.port, frame_max=4096)
    assert got is not None and got.body == body
    assert max(got.body_frame_sizes) == 4096, "body frames must fill the client's frame_max"
    assert got.properties["headers"] == reference_headers()

    raw = RawAMQP(proxy.host, proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost, frame_max=4096)
        assert raw.frame_max == 4096
        raw.open_channel(1)
        raw.rpc(1, commands.Basic.Consume(queue=q, no_ack=True), commands.Basic.ConsumeOk)
        sizes = []
        received = b""
        while True:  # every frame, method and header included, fits 4096
            ftype, _ch, payload = _read_raw_frame(raw, 10)
            assert len(payload) + 8 <= 4096, f"frame of {len(payload) + 8} bytes > frame_max"
            if ftype == 2:
                (size,) = struct.unpack_from(">Q", payload, 4)
                assert size == MIB
            elif ftype == 3:
                sizes.append(len(payload) + 8)
                received += payload
                if len(received) >= MIB:
                    break
        assert received == body
        # the proxy re-splits each 128 KiB upstream frame on its own (4096-byte frames plus a
        # shorter tail per upstream frame): legal, every frame is within frame_max and not empty
        assert min(sizes) > 8 and max(sizes) == 4096
    finally:
        raw.close()


def test_raw_channel_2047_and_random_ids(proxy, tenant, queues):
    q = queues.declare(tenant)
    raw = RawAMQP(proxy.host, proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost, channel_max=2047)
        assert raw.channel_max == 2047
        ids = [2047, 2046, 1, 777, 1500, 3]
        for cid in ids:
            raw.open_channel(cid)
            raw.rpc(cid, commands.Confirm.Select(), commands.Confirm.SelectOk)
            raw.publish(cid, "", q, f"from-{cid}".encode())
            ack = raw.expect(commands.Basic.Ack, cid)
            assert ack.delivery_tag == 1
        for cid in ids:
            raw.send(cid, commands.Basic.Get(queue=q, no_ack=True))
            ok = raw.expect(commands.Basic.GetOk, cid)
            assert ok.delivery_tag == 1
            raw.expect(pheader.ContentHeader, cid)
            body = raw.expect(pbody.ContentBody, cid)
            assert body.value == f"from-{cid}".encode()
        for cid in ids:
            raw.rpc(cid, commands.Channel.Close(200, "bye", 0, 0), commands.Channel.CloseOk)
    finally:
        raw.close()
