"""Byte-level tests of the sans-I/O frame code."""

import struct

import pytest
from pamqp import commands, frame

from amqproxy.amqp import constants as c
from amqproxy.amqp import frames
from amqproxy.amqp.frames import FrameError


def method(channel: int, m: object) -> bytes:
    return frame.marshal(m, channel)  # type: ignore[arg-type]


def test_scan_finds_complete_frames_and_keeps_the_partial_one() -> None:
    a = method(1, commands.Basic.Publish(exchange="x", routing_key="rk"))
    b = frames.encode(c.FRAME_BODY, 1, b"hello")
    data = a + b + b[:5]
    found, pos = frames.scan(data, 131072)
    assert [(t, ch) for t, ch, _, _ in found] == [(c.FRAME_METHOD, 1), (c.FRAME_BODY, 1)]
    assert pos == len(a) + len(b)
    _, _, start, end = found[1]
    assert data[start:end] == b"hello"


def test_scan_waits_for_the_frame_end_octet() -> None:
    b = frames.encode(c.FRAME_BODY, 3, b"abc")
    found, pos = frames.scan(b[:-1], 4096)
    assert found == [] and pos == 0


def test_scan_rejects_a_bad_frame_end() -> None:
    b = bytearray(frames.encode(c.FRAME_BODY, 3, b"abc"))
    b[-1] = 0x00
    with pytest.raises(FrameError) as err:
        frames.scan(bytes(b), 4096)
    assert err.value.code == c.FRAME_ERROR


def test_scan_rejects_a_frame_above_frame_max_before_it_arrives() -> None:
    head = struct.pack(">BHI", c.FRAME_BODY, 1, 5000)
    with pytest.raises(FrameError) as err:
        frames.scan(head, 4096)
    assert err.value.code == c.FRAME_ERROR
    assert "exceeds frame_max 4096" in err.value.text


@pytest.mark.parametrize(
    "m",
    [
        commands.Basic.Deliver("ctag-1", 7, False, "ex", "rk"),
        commands.Basic.GetOk(7, False, "ex", "rk", 0),
        commands.Basic.Ack(7, True),
        commands.Basic.Nack(7, False, True),
        commands.Basic.Reject(7, True),
    ],
)
def test_retag_shifts_the_delivery_tag_and_keeps_the_rest(m: object) -> None:
    data = method(2, m)
    ((_, _, start, end),) = frames.scan(data, 4096)[0]
    mid = frames.method_id_at(data, start)
    payload = frames.retag(data, start, end, frames.tag_position(mid, data, start), -5)
    decoded = frames.decode_method(payload)
    assert decoded.delivery_tag == 2  # type: ignore[attr-defined]
    original = frames.decode_method(data[start:end])
    for name in ("multiple", "requeue", "redelivered", "exchange", "routing_key"):
        if hasattr(original, name):
            assert getattr(decoded, name) == getattr(original, name)


def test_retag_leaves_tag_zero_alone() -> None:
    data = method(1, commands.Basic.Ack(0, True))
    ((_, _, start, end),) = frames.scan(data, 4096)[0]
    assert frames.decode_method(frames.retag(data, start, end, start + 4, 9)).delivery_tag == 0


def test_split_body_respects_the_frame_size() -> None:
    body = bytes(range(256)) * 40  # 10240 bytes
    data = b"".join(frames.split_body(4, body, 4096 - 8))
    found, pos = frames.scan(data, 4096)
    assert pos == len(data)
    assert [end - start for _, _, start, end in found] == [4088, 4088, 2064]
    assert all(ch == 4 and t == c.FRAME_BODY for t, ch, _, _ in found)
    assert b"".join(data[s:e] for _, _, s, e in found) == body


def test_decode_method_reports_unknown_and_malformed_methods() -> None:
    with pytest.raises(FrameError) as err:
        frames.decode_method(struct.pack(">HH", 99, 99))
    assert err.value.code == c.COMMAND_INVALID
    with pytest.raises(FrameError) as err:
        frames.decode_method(struct.pack(">HH", 50, 10) + b"\x00")
    assert err.value.code == c.SYNTAX_ERROR


def test_reply_text_fits_a_shortstr() -> None:
    assert frames.reply_text("short") == "short"
    long = "RESOURCE_LOCKED - " + "\u00e9" * 200  # 418 bytes in UTF-8
    cut = frames.reply_text(long)
    assert len(cut.encode()) <= 255 and long.startswith(cut)
