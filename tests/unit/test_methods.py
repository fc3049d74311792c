"""Method arguments and content headers, checked as the broker decodes them: every method of
the spec decodes from pamqp's encoding, every truncation or extra byte is refused with the
broker's answer (never a Python exception), tables are bounded, headers exact."""

from __future__ import annotations

import datetime
import struct
import warnings
from decimal import Decimal
from typing import Any

import pytest
from pamqp import commands, frame
from pamqp import header as pheader

from amqproxy.amqp import constants as c
from amqproxy.amqp import methods, scan
from amqproxy.amqp.frames import FrameError
from amqproxy.amqp.recent import Recent


def _recover_async() -> commands.Basic.RecoverAsync:
    with warnings.catch_warnings():  # deprecated in 0-9-1, still sent by old clients
        warnings.simplefilter("ignore", DeprecationWarning)
        return commands.Basic.RecoverAsync(requeue=True)


SAMPLES = [
    commands.Channel.Flow(active=True),
    commands.Channel.Close(404, "NOT_FOUND - x", 60, 40),
    commands.Exchange.Declare(
        exchange="e", exchange_type="topic", durable=True, arguments={"alternate-exchange": "ae"}
    ),
    commands.Exchange.Delete(exchange="e", if_unused=True),
    commands.Exchange.Bind(destination="d", source="s", routing_key="k", arguments={"a": 1}),
    commands.Exchange.Unbind(destination="d", source="s", routing_key="k"),
    commands.Queue.Declare(
        queue="q",
        exclusive=True,
        nowait=True,
        arguments={"x-max-length": 5, "n": {"a": [1, "b", {"c": None}]}},
    ),
    commands.Queue.Bind(queue="q", exchange="e", routing_key="k", arguments={"x": "y"}),
    commands.Queue.Purge(queue="q"),
    commands.Queue.Delete(queue="q", if_empty=True),
    commands.Queue.Unbind(queue="q", exchange="e", routing_key="k"),
    commands.Basic.Qos(prefetch_size=0, prefetch_count=10, global_=True),
    commands.Basic.Consume(queue="q", consumer_tag="t", no_ack=True, arguments={"x-priority": 3}),
    commands.Basic.Cancel(consumer_tag="t"),
    commands.Basic.Publish(exchange="e", routing_key="k", mandatory=True),
    commands.Basic.Get(queue="q", no_ack=True),
    commands.Basic.Ack(delivery_tag=7, multiple=True),
    commands.Basic.Reject(delivery_tag=8, requeue=False),
    _recover_async(),
    commands.Basic.Recover(requeue=False),
    commands.Basic.Nack(delivery_tag=9, multiple=False, requeue=True),
    commands.Confirm.Select(nowait=True),
    commands.Tx.Select(),
    commands.Tx.Commit(),
    commands.Tx.Rollback(),
    commands.Queue.DeclareOk(queue="amq.gen-x", message_count=3, consumer_count=1),
    commands.Connection.Close(320, "CONNECTION_FORCED - bye", 0, 0),
    commands.Connection.UpdateSecret(new_secret="token", reason="refresh"),
]


def payload(method: object) -> bytes:
    return frame.marshal(method, 1)[7:-1]  # type: ignore[arg-type]


@pytest.mark.parametrize("method", SAMPLES, ids=lambda m: m.name)
def test_every_method_decodes_to_what_pamqp_encoded(method: object) -> None:
    data = payload(method)
    values = methods.decode(method.index, data, 0, len(data))  # type: ignore[attr-defined]
    for name in method.__slots__:  # type: ignore[attr-defined]
        expected = getattr(method, name)
        got = values[name]
        if isinstance(expected, str):
            assert got == expected.encode()
        elif isinstance(expected, dict):
            assert isinstance(got, bytes)  # tables stay bytes (checked, not decoded)
        else:
            assert got == expected, name
    # and encode() gives the same bytes back
    assert methods.encode(method.index, **values) == data  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", SAMPLES, ids=lambda m: m.name)
def test_every_truncation_and_every_extra_byte_is_the_brokers_501(method: object) -> None:
    data = payload(method)
    mid = method.index  # type: ignore[attr-defined]
    for cut in range(4, len(data)):
        with pytest.raises(FrameError) as err:
            methods.decode(mid, data[:cut], 0, cut)
        assert err.value.code == c.FRAME_ERROR, cut
        shown = ",".join(str(b) for b in data[4:cut])
        assert err.value.text.startswith("FRAME_ERROR - cannot decode <<" + shown[:60])
    with pytest.raises(FrameError) as err:
        methods.decode(mid, data + b"\x00", 0, len(data) + 1)
    assert err.value.code == c.FRAME_ERROR


def test_repeated_payloads_decode_from_the_last_ones_and_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """decode_repeated answers as decode does, from the payloads decoded last when it can: a
    copy each time, a bounded number of payloads of a bounded size, and what fails to decode
    is refused the same way and never kept."""
    kept: Recent[dict[str, Any]] = Recent(entries=4, max_size=256)
    monkeypatch.setattr(methods, "DECODED", kept)
    for method in SAMPLES:
        data = payload(method)
        mid = struct.unpack_from(">I", data)[0]
        want = methods.decode(mid, data, 0, len(data))
        first = methods.decode_repeated(mid, data, 0, len(data))
        first["changed"] = True  # the caller's copy
        assert methods.decode_repeated(mid, data, 0, len(data)) == want
        assert len(kept) <= 4 and all(len(p) <= kept.max_size for p in kept.keys())
        with pytest.raises(FrameError) as err:
            methods.decode_repeated(mid, data + b"\x00", 0, len(data) + 1)
        assert err.value.code == c.FRAME_ERROR and data + b"\x00" not in kept
    close = payload(commands.Channel.Close(200, "bye", 0, 0))
    methods.decode_repeated(c.CHANNEL_CLOSE, close, 0, len(close))
    assert close in kept


def test_unknown_method_ids_are_command_invalid() -> None:
    with pytest.raises(FrameError) as err:
        methods.decode(c.method_id(99, 1), b"\x00\x63\x00\x01", 0, 4)
    assert err.value.code == c.COMMAND_INVALID


def nested(depth: int) -> bytes:
    """A table content with ``depth`` levels of tables inside."""
    inner = b""
    for _ in range(depth):
        inner = b"\x01kF" + struct.pack(">I", len(inner)) + inner
    return inner


def test_tables_are_walked_without_recursion_and_bounded() -> None:
    ok = nested(methods.MAX_TABLE_DEPTH - 1)
    assert methods.table_error(ok, 0, len(ok)) is None
    deep = nested(methods.MAX_TABLE_DEPTH)
    assert "deeper" in (methods.table_error(deep, 0, len(deep)) or "")
    huge = nested(100_000)  # no RecursionError, no time wasted
    assert "deeper" in (methods.table_error(huge, 0, len(huge)) or "")
    declare = methods.encode(c.QUEUE_DECLARE, queue=b"q", arguments=deep)
    with pytest.raises(FrameError) as err:
        methods.decode(c.QUEUE_DECLARE, declare, 0, len(declare))
    assert err.value.code == c.RESOURCE_ERROR
    for bad in (b"\x01kZ", b"\x01kS\x00\x00\x00\x09ab", b"\x05", b"\x01kA\x00\x00\x00\x02Z\x00"):
        assert methods.table_error(bad, 0, len(bad)) is not None, bad


def header(properties: commands.Basic.Properties, size: int = 5) -> bytes:
    return frame.marshal(pheader.ContentHeader(0, size, properties), 1)[7:-1]


FULL = commands.Basic.Properties(
    content_type="application/json", content_encoding="gzip",
    headers={"a": 1, "t": {"n": [1, "x", Decimal("1.5")]}, "b": bytearray(b"\x00\xff")},
    delivery_mode=2, priority=9, correlation_id="c", reply_to="r", expiration="60000",
    message_id="m", timestamp=datetime.datetime(2024, 1, 2, 3, 4, 5), message_type="t",
    user_id="u", app_id="a",
)  # fmt: skip


@pytest.mark.parametrize("properties", [commands.Basic.Properties(), FULL])
def test_content_headers_pass_exactly_and_every_truncation_is_refused(properties) -> None:  # type: ignore[no-untyped-def]
    data = header(properties)
    assert methods.content_header_error(data, 0, len(data)) is None
    assert methods.body_size(data, 0, len(data)) == 5
    for cut in range(0, len(data)):
        assert methods.content_header_error(data, 0, cut) is not None, cut
    assert methods.content_header_error(data + b"x", 0, len(data) + 1) is not None


def test_content_headers_the_broker_chokes_on_get_its_codes() -> None:
    base = struct.pack(">HHQ", 60, 0, 1)
    cases = {
        struct.pack(">HH", 60, 0): c.FRAME_ERROR,
        struct.pack(">HHQH", 50, 0, 1, 0): c.UNEXPECTED_FRAME,
        struct.pack(">HHQH", 60, 1, 1, 0): c.UNEXPECTED_FRAME,
        base + b"\x80\x00": c.FRAME_ERROR,  # content-type announced, missing
        base + b"\x00\x01": c.FRAME_ERROR,  # more flags announced
        base + b"\x20\x00" + struct.pack(">I", 3) + b"\x01aZ": c.FRAME_ERROR,  # unknown type
        base + b"\x20\x00" + struct.pack(">I", len(nested(40))) + nested(40): c.RESOURCE_ERROR,
    }
    for data, code in cases.items():
        problem = methods.content_header_error(data, 0, len(data))
        assert problem is not None and problem[0] == code, data


def test_the_compiled_scanner_checks_headers_like_methods_does() -> None:
    """A publish whose header fails the check stops the run at the publish (the slow path
    answers it); in C and in Python alike."""
    publish = frame.marshal(commands.Basic.Publish(exchange="", routing_key="q"), 1)
    body = frame.marshal(__import__("pamqp.body", fromlist=["x"]).ContentBody(b"abcde"), 1)
    good = publish + frame.marshal(pheader.ContentHeader(0, 5, FULL), 1) + body
    runs = [scan.client_run_py] + ([scan.client_run] if scan.COMPILED else [])
    for run in runs:
        assert run(good, 0, 1, 131064, True, 1)[:2] == (len(good), 1)
        for bad_header, _ in [(struct.pack(">HHQH", 60, 0, 5, 0x8000), 0)]:
            bad = publish + struct.pack(">BHI", 2, 1, len(bad_header)) + bad_header + b"\xce"
            assert run(bad + body, 0, 1, 131064, True, 1)[:2] == (0, 0)
