"""One client's mistake stays that client's (issue 4): protocol errors that the broker answers
by closing the whole connection are caught by the proxy for the client that made them — with
the code the broker itself gives — and never reach the shared upstream connection, so a
bystander with the same credentials keeps publishing with confirms."""

from __future__ import annotations

import struct

import pytest
from pamqp import body as pbody
from pamqp import commands
from pamqp import frame as pframe
from pamqp import header as pheader
from support import BROKER_PORT, UPSTREAM_CONNECTS, drain
from support.raw import RawAMQP, RawClosed, RawConnectionClose


def _publish(channel: int, immediate: bool = False) -> bytes:
    return pframe.marshal(
        commands.Basic.Publish(exchange="", routing_key="nowhere", immediate=immediate), channel
    )


def _header(channel: int, size: int = 1) -> bytes:
    return pframe.marshal(pheader.ContentHeader(0, size, commands.Basic.Properties()), channel)


def _bad_end() -> bytes:
    frame = bytearray(pframe.marshal(commands.Basic.Qos(0, 1, False), 1))
    frame[-1] = 0x00
    return bytes(frame)


def _method(channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce"


def _content_header(channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", 2, channel, len(payload)) + payload + b"\xce"


# name -> bytes sent after the handshake and Channel.Open(1) (channel_max negotiated: 16)
MISTAKES = {
    "frame-on-unopened-channel": pframe.marshal(commands.Basic.Qos(0, 1, False), 3),
    "second-channel-open": pframe.marshal(commands.Channel.Open(), 1),
    "header-without-publish": _header(1),
    "body-without-header": pframe.marshal(pbody.ContentBody(b"x"), 1),
    "method-inside-content": _publish(1) + pframe.marshal(commands.Basic.Qos(0, 1, False), 1),
    "bad-frame-end": _bad_end(),
    "unknown-frame-type": struct.pack(">BHI", 9, 1, 1) + b"x\xce",
    "immediate-publish": _publish(1, immediate=True)
    + _header(1)
    + pframe.marshal(pbody.ContentBody(b"x"), 1),
    # Arguments that do not decode (a fuzzer's finds): the broker closes the connection
    "tx-select-with-arguments": bytes.fromhex("01000100000007005a000aa0ef24ce"),
    "reject-3-bytes": bytes.fromhex("01000100000007003c005ae0652ece"),
    "nack-1-byte": bytes.fromhex("01000100000005003c007815ce"),
    "ack-short": _method(1, bytes.fromhex("003c0050") + bytes(8)),
    "connection-close-on-channel": bytes.fromhex("01000100000004000a0032ce"),
    "connection-open-on-channel": pframe.marshal(commands.Connection.Open("/"), 1),
    "empty-publish": bytes.fromhex("01000100000004003c0028ce"),
    "publish-with-a-byte-too-many": _method(
        1, pframe.marshal(commands.Basic.Publish(exchange="", routing_key="q"), 1)[7:-1] + b"\x00"
    ),
    "method-frame-of-3-bytes": _method(1, bytes.fromhex("003c00")),
    "qos-ok-from-client": pframe.marshal(commands.Basic.QosOk(), 1),
    "flow-ok-from-client": pframe.marshal(commands.Channel.FlowOk(active=True), 1),
    "header-of-class-50": _publish(1) + _content_header(1, struct.pack(">HHQH", 50, 0, 1, 0)),
    "header-with-weight": _publish(1) + _content_header(1, struct.pack(">HHQH", 60, 1, 1, 0)),
    "header-of-4-bytes": _publish(1) + _content_header(1, struct.pack(">HH", 60, 0)),
}


def _reply_to(port: int, user: str, password: str, vhost: str, mistake: bytes) -> int:
    """The Connection.Close code the server sends for ``mistake`` (0: the socket just closed)."""
    raw = RawAMQP("127.0.0.1", port)
    try:
        raw.handshake(user, password, vhost, channel_max=16)
        raw.open_channel(1)
        raw.send_raw(mistake)
        try:
            raw.read_until(lambda c, v: False, timeout=5)
        except RawConnectionClose as close:
            return close.reply_code
        except RawClosed:
            return 0
        raise AssertionError("the server ignored the mistake")
    finally:
        raw.abort()


@pytest.fixture(scope="module")
def broker_codes() -> dict[str, int]:
    """What RabbitMQ itself answers to each mistake, on a direct connection."""
    return {
        name: _reply_to(BROKER_PORT, "guest", "guest", "/", data) for name, data in MISTAKES.items()
    }


@pytest.mark.timeout(90)
def test_each_mistake_gets_the_brokers_code_and_spares_the_bystander(
    proxy, tenant, queues, broker_codes
):
    q = queues.declare(tenant)
    bystander = proxy.connect(tenant)
    channel = bystander.channel()
    channel.confirm_delivery()  # a publish raises if the shared upstream died under it
    sent = []
    for name, data in MISTAKES.items():
        code = _reply_to(proxy.port, tenant.user, tenant.password, tenant.vhost, data)
        assert code == broker_codes[name], f"{name}: proxy {code}, broker {broker_codes[name]}"
        body = f"after {name}".encode()
        channel.basic_publish("", q, body)
        sent.append(body)
    bystander.close()
    assert [b for b, _, _ in drain(tenant, q)] == sent
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) == 1  # never torn down


@pytest.mark.timeout(30)
def test_channel_above_channel_max_is_refused_and_a_second_close_answered(proxy, tenant):
    """The proxy holds clients to the channel_max they negotiated (530 NOT_ALLOWED; RabbitMQ
    3.10 lets it pass, the README says so). A second Channel.Close gets CloseOk, as from
    RabbitMQ, and the connection lives on."""
    code = _reply_to(
        proxy.port,
        tenant.user,
        tenant.password,
        tenant.vhost,
        pframe.marshal(commands.Channel.Open(), 17),
    )
    assert code == 530
    raw = RawAMQP(proxy.host, proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost, channel_max=16)
        raw.open_channel(16)
        raw.send_raw(pframe.marshal(commands.Channel.Close(200, "", 0, 0), 16) * 2)
        raw.expect(commands.Channel.CloseOk, 16)
        raw.expect(commands.Channel.CloseOk, 16)
        raw.open_channel(16)
    finally:
        raw.close()


@pytest.mark.timeout(30)
def test_pipelined_publishes_after_a_broker_channel_error_are_discarded(proxy, tenant, queues):
    """After the broker closes a channel (404), frames the client already sent on it are
    discarded until its CloseOk: the connection and its other channels live on."""
    q = queues.declare(tenant)
    raw = RawAMQP(proxy.host, proxy.port)
    try:
        raw.handshake(tenant.user, tenant.password, tenant.vhost)
        raw.open_channel(1)
        raw.open_channel(2)
        burst = b"".join(
            raw.content_frames(1, "no-such-exchange-itest", "k", b"x") for _ in range(200)
        )
        raw.send_raw(burst)
        close = raw.expect(commands.Channel.Close, 1)
        assert close.reply_code == 404
        raw.send_raw(burst)  # still pipelining on the closed channel: discarded
        raw.send(1, commands.Channel.CloseOk())
        raw.publish(2, "", q, b"on channel 2")
        raw.rpc(2, commands.Queue.Declare(queue=q, passive=True), commands.Queue.DeclareOk)
        raw.open_channel(1)  # the id is usable again
    finally:
        raw.close()
    assert [b for b, _, _ in drain(tenant, q)] == [b"on channel 2"]
