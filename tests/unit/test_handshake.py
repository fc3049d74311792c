"""The handshake decoders agree with pamqp's encoder and reject truncated input."""

import pytest
from pamqp import commands, frame

from amqproxy.amqp import constants as c
from amqproxy.amqp import handshake
from amqproxy.amqp.frames import FrameError
from amqproxy.amqp.recent import Recent


def payload(method: object) -> bytes:
    return frame.marshal(method, 0)[7:-1]  # type: ignore[arg-type]


def start_ok_payload(props: dict, mechanism: str = "PLAIN") -> bytes:  # type: ignore[type-arg]
    return payload(commands.Connection.StartOk(props, mechanism, "\0u\0p", "en_US"))


def test_start_ok() -> None:
    props = {"product": "x", "capabilities": {"connection.blocked": True}, "connection_name": "n"}
    got = handshake.start_ok(start_ok_payload(props))
    assert (got.connection_name, got.wants_blocked) == ("n", True)
    assert (got.mechanism, got.response, got.locale) == ("PLAIN", b"\0u\0p", "en_US")
    plain = handshake.start_ok(start_ok_payload({"product": "y"}))
    assert (plain.connection_name, plain.wants_blocked) == ("", False)
    off = {"capabilities": {"connection.blocked": False, "publisher_confirms": True}}
    assert handshake.start_ok(start_ok_payload(off)).wants_blocked is False


def test_client_properties_are_walked_not_decoded_and_bounded() -> None:
    """A deep or malformed properties table is refused (502), never decoded recursively."""
    import struct

    deep = b""
    for _ in range(200):
        deep = b"\x01kF" + struct.pack(">I", len(deep)) + deep
    raw = struct.pack(">HHI", 10, 11, len(deep)) + deep + b"\x05PLAIN" + struct.pack(">I", 5)
    raw += b"\0u\0p\x05en_US"
    with pytest.raises(FrameError) as err:
        handshake.start_ok(raw)
    assert err.value.code == c.SYNTAX_ERROR


def test_tune_ok_and_open() -> None:
    assert handshake.tune_ok(payload(commands.Connection.TuneOk(7, 4096, 3))) == (7, 4096, 3)
    vhost = handshake.open_vhost(payload(commands.Connection.Open("/vh\u00e9")))
    assert vhost == "/vh\u00e9".encode()


@pytest.mark.parametrize("cut", [5, 12, 30])
def test_truncated_start_ok_is_a_syntax_error(cut: int) -> None:
    data = payload(commands.Connection.StartOk({"a": "b"}, "PLAIN", "\0u\0p", "en_US"))
    with pytest.raises(FrameError) as err:
        handshake.start_ok(data[:cut])
    assert err.value.code == c.SYNTAX_ERROR


def test_truncated_tune_ok_and_open() -> None:
    with pytest.raises(FrameError):
        handshake.tune_ok(payload(commands.Connection.TuneOk(1, 4096, 0))[:6])
    with pytest.raises(FrameError):
        handshake.open_vhost(payload(commands.Connection.Open("/long-vhost"))[:7])


def test_what_is_not_an_amqp_broker_is_told_apart_from_a_start_in_pieces() -> None:
    """The first bytes from the broker's address: a Connection.Start (whole or in pieces) is
    fine, anything else is named, with what it answered."""
    start = frame.marshal(commands.Connection.Start(server_properties={"product": "x"}), 0)
    for cut in range(len(start) + 1):
        assert handshake.not_amqp(start[:cut]) is None, cut
    for partial_header in (b"A", b"AMQ", b"AMQP\x00\x00"):
        assert handshake.not_amqp(partial_header) is None
    http = handshake.not_amqp(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    assert http == "upstream is not an AMQP 0-9-1 broker (it answered 'HTTP/1.1 400 Bad Request')"
    amqp10 = handshake.not_amqp(b"AMQP\x00\x01\x00\x00")
    assert amqp10 is not None and "protocol header AMQP 0.1.0.0" in amqp10
    tune = frame.marshal(commands.Connection.Tune(), 0)
    assert "not Connection.Start" in (handshake.not_amqp(tune) or "")
    assert "not Connection.Start" in (handshake.not_amqp(b"\x01\x00\x05\x00") or "")
    assert "not Connection.Start" in (handshake.not_amqp(b"\x01\x00\x00\x7f\xff\xff\xff") or "")
    tls_alert = handshake.not_amqp(b"\x15\x03\x01\x00\x02\x02\x46")
    assert tls_alert is not None and tls_alert.startswith(handshake.NOT_AMQP)


def test_known_client_properties_are_looked_up_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeated properties table is answered from the known ones, which keep a bounded
    number of tables of a bounded size; what is refused is never kept, and a truncated
    StartOk is refused even when its cut table is known."""
    known: Recent[tuple[str, frozenset[bytes]]] = Recent(entries=3, max_size=4096)
    monkeypatch.setattr(handshake, "KNOWN_PROPERTIES", known)
    props = {"product": "p", "capabilities": {"connection.blocked": True}, "connection_name": "a"}
    data = start_ok_payload(props)
    first = handshake.start_ok(data)
    assert list(known.values()) == [("a", frozenset({b"connection.blocked"}))]
    # The same bytes again, from a writable buffer too: the same answer.
    assert handshake.start_ok(data) == first == handshake.start_ok(bytearray(data))
    assert len(known) == 1
    # Entries beyond the bound push the oldest out.
    for name in ("b", "c", "d"):
        handshake.start_ok(start_ok_payload({**props, "connection_name": name}))
    assert len(known) == 3 and ("a", frozenset({b"connection.blocked"})) not in known.values()
    # A table over the size bound is read but not kept.
    before = known.keys()
    handshake.start_ok(start_ok_payload({"x": "y" * known.max_size}))
    assert known.keys() == before and all(len(t) <= known.max_size for t in before)
    # A malformed table (unknown field type) is refused and not kept.
    bad = bytearray(start_ok_payload({"k": "v"}))
    bad[8 + 2] = ord("?")
    with pytest.raises(FrameError):
        handshake.start_ok(bytes(bad))
    bad_table = bytes(bad[8 : 8 + int.from_bytes(bad[4:8], "big")])
    assert bad_table not in known and known.keys() == before
    # A StartOk cut inside a table that is known is still refused.
    data = start_ok_payload({**props, "connection_name": "d"})
    table_end = 8 + int.from_bytes(data[4:8], "big")
    assert data[8:table_end] in known
    with pytest.raises(FrameError) as err:
        handshake.start_ok(data[: table_end - 1])
    assert err.value.code == c.SYNTAX_ERROR
