"""The frame-run scanners: where a run stops, byte by byte, for the C and the Python versions.

The C extension and its pure-Python twin must agree on every input (the proxy uses whichever is
installed); the fuzz test throws truncated, corrupted and mixed streams at both.
"""

import random
from collections.abc import Callable

import pytest
from pamqp import commands, frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from amqproxy.amqp import scan

BOTH = {"python": (scan.broker_run_py, scan.client_run_py)}
if scan.COMPILED:
    BOTH["c"] = (scan.broker_run, scan.client_run)
MAX = 131072 - 8


def same_channel(
    client_run: scan.ClientScanner,
) -> Callable[[bytes, int, int, int, bool], tuple[int, int]]:
    """The client scanner for a channel with the same upstream id: (stop, publishes)."""

    def run(data: bytes, pos: int, ch: int, limit: int, acks_ok: bool) -> tuple[int, int]:
        stop, n, moved = client_run(data, pos, ch, limit, acks_ok, ch)
        assert moved is None  # same id: the frames go up as they are
        return stop, n

    return run


def test_the_compiled_scanner_is_built() -> None:
    # `pip install -e .` builds it (setup.py); without it the proxy works but spends more CPU.
    assert scan.COMPILED, "amqproxy.amqp._scan is not built: is a C compiler installed?"


def m(channel: int, method: object) -> bytes:
    return frame.marshal(method, channel)  # type: ignore[arg-type]


def message(channel: int, data: bytes, frame_body: int = MAX, **publish: object) -> bytes:
    out = [m(channel, commands.Basic.Publish(exchange="", routing_key="q", **publish))]
    out.append(header(channel, len(data)))
    out += [body(channel, data[i : i + frame_body]) for i in range(0, len(data), frame_body)]
    return b"".join(out)


def rich_message(channel: int, depth: int) -> bytes:
    """A publish whose header carries properties and a headers table ``depth`` levels deep."""
    table: dict[str, object] = {"leaf": "v", "n": 7}
    for _ in range(depth):
        table = {"t": table, "a": [1, "x"]}
    props = commands.Basic.Properties(content_type="t", headers=table, priority=3, app_id="a")
    out = m(channel, commands.Basic.Publish(exchange="", routing_key="q"))
    out += frame.marshal(ContentHeader(0, 3, props), channel)
    return out + body(channel, b"abc")


def header(channel: int, size: int) -> bytes:
    return frame.marshal(ContentHeader(0, size, commands.Basic.Properties()), channel)


def body(channel: int, data: bytes) -> bytes:
    return frame.marshal(ContentBody(data), channel)


def delivery(channel: int, tag: int, data: bytes) -> bytes:
    d = m(channel, commands.Basic.Deliver(consumer_tag="c", delivery_tag=tag, routing_key="q"))
    return d + header(channel, len(data)) + (body(channel, data) if data else b"")


def ack(channel: int, tag: int) -> bytes:
    return m(channel, commands.Basic.Ack(delivery_tag=tag))


@pytest.mark.parametrize("impl", sorted(BOTH))
def test_client_run_takes_whole_plain_messages_and_stops_before_the_rest(impl: str) -> None:
    client_run = same_channel(BOTH[impl][1])
    a = message(1, b"a" * 100)
    b = message(1, b"b" * 1000, frame_body=300)  # 4 body frames
    empty = message(1, b"")  # header only
    mandatory = message(1, b"m", mandatory=True)
    data = a + b + empty + ack(1, 7) + mandatory + a
    assert client_run(data, 0, 1, MAX, True) == (len(a + b + empty + ack(1, 7)), 3)
    # acks are the caller's when their tags need translating
    assert client_run(data, 0, 1, MAX, False) == (len(a + b + empty), 3)
    # another channel, another method, a frame above the limit: stop in front of it
    assert client_run(a + message(2, b"x"), 0, 1, MAX, True) == (len(a), 1)
    assert client_run(a + m(1, commands.Basic.Qos()), 0, 1, MAX, True) == (len(a), 1)
    assert client_run(b, 0, 1, 299, True) == (0, 0)


@pytest.mark.parametrize("impl", sorted(BOTH))
def test_client_run_leaves_an_incomplete_message_whole(impl: str) -> None:
    client_run = same_channel(BOTH[impl][1])
    a = message(1, b"a" * 100)
    b = message(1, b"b" * 1000, frame_body=300)
    for cut in range(1, len(b)):
        assert client_run(a + b[:cut], 0, 1, MAX, True) == (len(a), 1), cut
    # a body longer than the header announced, a body without header: the caller's error
    pub = m(1, commands.Basic.Publish(exchange="", routing_key="q"))
    ten = body(1, b"0123456789")
    assert client_run(pub + header(1, 15) + ten + ten, 0, 1, MAX, True) == (0, 0)
    assert client_run(pub + ten, 0, 1, MAX, True) == (0, 0)
    assert client_run(pub + header(1, 20) + ten + ten + pub, 0, 1, MAX, True) == (
        len(pub + header(1, 20) + ten + ten),
        1,
    )
    bad_end = bytearray(a)
    bad_end[-1] = 0
    assert client_run(bytes(bad_end), 0, 1, MAX, True) == (0, 0)


@pytest.mark.parametrize("impl", sorted(BOTH))
def test_client_run_copies_the_walked_frames_to_another_channel(impl: str) -> None:
    client_run = BOTH[impl][1]
    a, b = message(1, b"a" * 100), message(1, b"b" * 1000, frame_body=300)
    data = a + b + ack(1, 3) + message(1, b"m", mandatory=True)
    stop, n, moved = client_run(data, 0, 1, MAX, True, 517)
    assert (stop, n) == (len(a + b + ack(1, 3)), 2)
    assert moved == message(517, b"a" * 100) + message(517, b"b" * 1000, frame_body=300) + ack(
        517, 3
    )
    assert client_run(data, len(a), 1, MAX, False, 2) == (
        len(a + b),
        1,
        message(2, b"b" * 1000, frame_body=300),
    )
    assert client_run(b"\x01\x00", 0, 1, MAX, True, 2) == (0, 0, None)


@pytest.mark.parametrize("impl", sorted(BOTH))
def test_broker_run_takes_content_and_deliveries(impl: str) -> None:
    scan_run, _ = BOTH[impl]

    def broker_run(data: bytes, pos: int, ch: int, limit: int, deliver_ok: bool) -> object:
        stop, n, confirmed, moved = scan_run(data, pos, ch, limit, deliver_ok, -1, 0, ch, True)
        assert (confirmed, moved) == (-1, None)  # no acks taken, nothing to rewrite
        return stop, n

    d1, d2 = delivery(1, 1, b"x" * 100), delivery(1, 2, b"")
    get_ok = m(
        1,
        commands.Basic.GetOk(
            delivery_tag=3, redelivered=False, exchange="", routing_key="q", message_count=0
        ),
    )
    data = d1 + d2 + get_ok
    assert broker_run(data, 0, 1, MAX, True) == (len(d1 + d2), 2)
    # tags to translate: the first Deliver is the caller's, content before it is not
    assert broker_run(data, 0, 1, MAX, False) == (0, 0)
    assert broker_run(d1, 20, 1, MAX, False)[0] == 20  # pos 20 is mid-frame: no frame there
    content = header(1, 100) + body(1, b"x" * 100)
    assert d1.endswith(content)
    assert broker_run(content + d2, 0, 1, MAX, False) == (len(content), 0)
    # frames go one by one on this side: the complete ones of a cut delivery are taken
    assert broker_run(d1 + d1[:-1], 0, 1, MAX, True) == (len(d1 + d1) - 108, 2)
    heartbeat = b"\x08\x00\x00\x00\x00\x00\x00\xce"
    assert broker_run(d1 + heartbeat + d1, 0, 1, MAX, True) == (len(d1), 1)
    assert broker_run(d1, 0, 1, 99, True) == (len(d1) - 108, 1)  # body frame of 100 > 99
    assert broker_run(ack(1, 1), 0, 1, MAX, True) == (0, 0)  # confirms only when asked


def confirm(channel: int, tag: int, multiple: bool = False) -> bytes:
    return m(channel, commands.Basic.Ack(delivery_tag=tag, multiple=multiple))


@pytest.mark.parametrize("impl", sorted(BOTH))
def test_broker_run_takes_in_order_confirms_and_renumbers(impl: str) -> None:
    broker_run, _ = BOTH[impl]
    acks = confirm(3, 11) + confirm(3, 12) + confirm(3, 20, multiple=True)
    # in order from 10: all taken, `confirmed` follows; same channel, no offset: sent as they are
    assert broker_run(acks, 0, 3, MAX, False, 10, 0, 3, False) == (len(acks), 0, 20, None)
    # a gap (11 is missing, 12 is not multiple): the caller's bookkeeping takes over
    assert broker_run(confirm(3, 12), 0, 3, MAX, False, 10, 0, 3, False) == (0, 0, 10, None)
    # the client's channel 1 and numbering: tags lowered by the offset, ids rewritten
    d = delivery(3, 5, b"abc")
    stop, n, confirmed, moved = broker_run(d + acks, 0, 3, MAX, True, 10, 8, 1, False)
    assert (stop, n, confirmed) == (len(d + acks), 1, 20)
    expected = delivery(1, 5, b"abc") + confirm(1, 3) + confirm(1, 4) + confirm(1, 12, True)
    assert moved == expected
    # confirms of publishes made before this client selected confirms (tag <= offset): stop
    assert broker_run(confirm(3, 8, True), 0, 3, MAX, True, 7, 8, 1, False) == (0, 0, 7, None)


@pytest.mark.parametrize("impl", sorted(BOTH))
def test_broker_run_drops_the_confirms_the_proxy_takes_for_itself(impl: str) -> None:
    broker_run, _ = BOTH[impl]
    acks = confirm(3, 11) + confirm(3, 15, True)
    d = delivery(3, 5, b"abc")
    # only confirms: all consumed, nothing left to forward (an empty copy, not None)
    assert broker_run(acks, 0, 3, MAX, True, 10, 0, 3, True) == (len(acks), 0, 15, b"")
    # between deliveries: the deliveries go on, renumbered or not, the confirms stay here
    assert broker_run(d + acks + d, 0, 3, MAX, True, 10, 0, 3, True) == (
        len(d + acks + d),
        2,
        15,
        d + d,
    )
    stop, n, confirmed, moved = broker_run(acks + d, 0, 3, MAX, True, 10, 0, 9, True)
    assert (stop, n, confirmed, moved) == (len(acks + d), 1, 15, delivery(9, 5, b"abc"))
    # no confirm in the run: the frames go out as they are
    assert broker_run(d, 0, 3, MAX, True, 10, 0, 3, True) == (len(d), 1, 10, None)
    # out of order: stop there, the caller records it
    assert broker_run(d + confirm(3, 13), 0, 3, MAX, True, 10, 0, 3, True) == (
        len(d),
        1,
        10,
        None,
    )


def test_c_and_python_agree_on_random_streams() -> None:
    if not scan.COMPILED:
        pytest.fail("amqproxy.amqp._scan is not built")
    rng = random.Random(4242)
    pieces = [
        lambda: message(1, rng.randbytes(rng.randrange(0, 700)), frame_body=rng.randrange(1, 300)),
        lambda: message(1, b"x", mandatory=rng.random() < 0.5),
        lambda: message(2, b"y"),
        lambda: rich_message(1, rng.randrange(0, 4)),
        lambda: delivery(1, rng.randrange(1, 1 << 40), rng.randbytes(rng.randrange(0, 300))),
        lambda: ack(1, rng.randrange(1, 99)),
        lambda: confirm(1, rng.randrange(1, 99), multiple=rng.random() < 0.7),
        lambda: m(1, commands.Basic.Nack(delivery_tag=1)),
        lambda: m(1, commands.Basic.Reject(delivery_tag=1)),
        lambda: m(
            1, commands.Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0)
        ),
        lambda: b"\x08\x00\x00\x00\x00\x00\x00\xce",
    ]
    checked = advanced = 0
    for _ in range(3000):
        data = bytearray(b"".join(rng.choice(pieces)() for _ in range(rng.randrange(1, 12))))
        for _ in range(rng.randrange(0, 3)):  # corrupt a few bytes
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.randrange(1, len(data) + 1)]  # and cut it anywhere
        raw = bytes(data)
        pos = rng.choice([0, 0, 0, rng.randrange(len(raw))])
        limit = rng.choice([MAX, MAX, 4088, 200, 0])
        for flag in (True, False):
            for ch in (1, 2):
                args = (raw, pos, ch, limit, flag)
                confirmed = rng.choice([-1, 0, rng.randrange(0, 99)])
                offset = rng.choice([0, 0, rng.randrange(0, 50)])
                to = rng.choice([ch, rng.randrange(65536)])
                broker_args = (*args, confirmed, offset, to, rng.random() < 0.5)
                broker = scan.broker_run(*broker_args)
                assert broker == scan.broker_run_py(*broker_args), broker_args
                stop = broker[0]
                client_args = (*args, rng.choice([ch, rng.randrange(65536)]))
                result = scan.client_run(*client_args)
                assert result == scan.client_run_py(*client_args), client_args
                checked += 1
                advanced += (stop > pos) + (result[0] > pos)
    assert checked == 12000
    assert advanced > 1000  # the streams exercise long runs, not only immediate stops
