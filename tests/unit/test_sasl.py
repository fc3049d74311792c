"""Credentials from PLAIN and AMQPLAIN responses."""

import struct

import pytest
from pamqp import encode

from amqproxy.amqp import constants as c
from amqproxy.amqp.auth import credentials
from amqproxy.amqp.frames import FrameError


def test_plain() -> None:
    assert credentials("PLAIN", "\x00alice\x00s3cr\u00e9t") == ("alice", "s3cr\u00e9t")
    assert credentials("PLAIN", b"\x00bob\x00pw") == ("bob", "pw")


def test_amqplain_is_a_table_without_its_length() -> None:
    table = encode.field_table({"LOGIN": "carol", "PASSWORD": "pw2"})
    raw = table[4:]
    assert struct.unpack(">I", table[:4])[0] == len(raw)
    assert credentials("AMQPLAIN", raw) == ("carol", "pw2")


@pytest.mark.parametrize(
    ("mechanism", "response"),
    [("PLAIN", "alice"), ("AMQPLAIN", b"\x05LOGIN"), ("EXTERNAL", ""), ("AMQPLAIN", b"")],
)
def test_unreadable_credentials_are_access_refused(mechanism: str, response: bytes) -> None:
    with pytest.raises(FrameError) as err:
        credentials(mechanism, response)
    assert err.value.code == c.ACCESS_REFUSED
