"""Credentials from PLAIN and AMQPLAIN responses: bytes in, bytes out, the broker's rules."""

import struct

import pytest
from pamqp import encode

from amqproxy.amqp import constants as c
from amqproxy.amqp.auth import Credentials, credentials
from amqproxy.amqp.frames import FrameError
from amqproxy.amqp.table import TableError, items


def amqplain(**fields: bytes) -> bytes:
    return b"".join(
        bytes([len(k)]) + k.encode() + b"S" + struct.pack(">I", len(v)) + v
        for k, v in fields.items()
    )


def test_plain_keeps_the_bytes() -> None:
    assert credentials("PLAIN", b"\x00alice\x00s3cr\xc3\xa9t") == (b"alice", b"s3cr\xc3\xa9t")
    # not valid UTF-8: kept as it is, never replaced (U+FFFD would be b"\xef\xbf\xbd")
    assert credentials("PLAIN", b"\x00bob\x00s\xffcret") == (b"bob", b"s\xffcret")
    assert credentials("PLAIN", b"\x00bob\x00") == (b"bob", b"")


@pytest.mark.parametrize(
    "response",
    [
        b"alice",  # no separator
        b"admin\x00alice\x00pw",  # an authorization identity: RabbitMQ refuses it
        b"\x00alice\x00pw\x00more",  # a NUL inside the password
        b"alice\x00pw",  # two fields
        b"",
    ],
)
def test_plain_responses_the_broker_refuses_are_refused(response: bytes) -> None:
    with pytest.raises(FrameError) as err:
        credentials("PLAIN", response)
    assert err.value.code == c.ACCESS_REFUSED


def test_amqplain_is_a_table_without_its_length() -> None:
    table = encode.field_table({"LOGIN": "carol", "PASSWORD": "pw2", "x": 5})
    raw = table[4:]
    assert struct.unpack(">I", table[:4])[0] == len(raw)
    assert credentials("AMQPLAIN", raw) == (b"carol", b"pw2")
    nul = amqplain(LOGIN=b"dave", PASSWORD=b"p\x00w\xff")
    assert credentials("AMQPLAIN", nul) == (b"dave", b"p\x00w\xff")


@pytest.mark.parametrize(
    ("mechanism", "response"),
    [
        ("PLAIN", b"alice"),
        ("AMQPLAIN", b"\x05LOGIN"),  # truncated
        ("AMQPLAIN", amqplain(LOGIN=b"x")),  # no password
        ("AMQPLAIN", amqplain(LOGIN=b"x", PASSWORD=b"y")[:-1]),  # value runs past the end
        ("AMQPLAIN", b"\x05LOGINs\x00\x05" + amqplain(PASSWORD=b"y")),  # LOGIN not a longstr
        ("AMQPLAIN", b"\x01kZ"),  # unknown field type
        ("EXTERNAL", b""),
        ("AMQPLAIN", b""),
    ],
)
def test_unreadable_credentials_are_access_refused(mechanism: str, response: bytes) -> None:
    with pytest.raises(FrameError) as err:
        credentials(mechanism, response)
    assert err.value.code == c.ACCESS_REFUSED


def test_upstream_login_presents_the_same_bytes() -> None:
    assert Credentials(b"u", b"p\xff").login() == ("PLAIN", b"\x00u\x00p\xff")
    mechanism, response = Credentials(b"u", b"p\x00q").login()
    assert mechanism == "AMQPLAIN" and credentials(mechanism, response) == (b"u", b"p\x00q")


def test_table_items_walks_every_type_without_decoding() -> None:
    table = encode.field_table(
        {"a": True, "b": 7, "s": "text", "n": {"deep": [1, "x"]}, "f": 1.5, "v": None}
    )[4:]
    found = {name: kind for name, kind, _value in items(table)}
    assert found == {b"a": ord("t"), b"b": ord("b"), b"s": ord("S"), b"n": ord("F"),
                     b"f": ord("f"), b"v": ord("V")}  # fmt: skip
    # cut anywhere: a whole-entry prefix, or TableError; never another exception
    boundaries = 0
    for cut in range(1, len(table)):
        try:
            boundaries += len(list(items(table[:cut]))) >= 0
        except TableError:
            continue
    assert 0 < boundaries < len(table) - 1
