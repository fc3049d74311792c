"""The handshake decoders agree with pamqp's encoder and reject truncated input."""

import pytest
from pamqp import commands, frame

from amqproxy.amqp import constants as c
from amqproxy.amqp import handshake
from amqproxy.amqp.frames import FrameError


def payload(method: object) -> bytes:
    return frame.marshal(method, 0)[7:-1]  # type: ignore[arg-type]


def test_start_ok() -> None:
    props = {"product": "x", "capabilities": {"connection.blocked": True}, "connection_name": "n"}
    got = handshake.start_ok(
        payload(commands.Connection.StartOk(props, "PLAIN", "\0u\0p", "en_US"))
    )
    assert got.client_properties == props
    assert (got.mechanism, got.response, got.locale) == ("PLAIN", b"\0u\0p", "en_US")


def test_client_properties_are_decoded_once_per_distinct_table() -> None:
    def start_ok(name: str) -> handshake.StartOk:
        props = {"product": "php", "connection_name": name}
        return handshake.start_ok(
            payload(commands.Connection.StartOk(props, "PLAIN", "\0u\0p", "en_US"))
        )

    first, again = start_ok("worker"), start_ok("worker")
    assert first.client_properties == {"product": "php", "connection_name": "worker"}
    assert again.client_properties is first.client_properties  # remembered, not re-decoded
    assert start_ok("other").client_properties["connection_name"] == "other"
    for i in range(handshake._TABLES_MAX + 10):  # a flood of distinct tables stays bounded
        start_ok(f"w{i}")
    assert len(handshake._TABLES) <= handshake._TABLES_MAX


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
