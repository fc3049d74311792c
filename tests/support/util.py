"""Paths, constants and small helpers of the test suites: free ports, polling, reply codes, the
proxy's metrics parsed by label."""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]  # the repository
SRC = Path(os.environ.get("AMQPROXY_TEST_SRC") or ROOT / "src")  # another version: A/B
BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672
BROKER_URL = f"amqp://{BROKER_HOST}:{BROKER_PORT}"
RABBITMQCTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"

# Configuration variables the proxy reads; scrubbed from the proxy's environment so the host's
# environment can never change what a test starts.
PROXY_ENV_VARS = (
    "AMQP_URL",
    "LISTEN_ADDRESS",
    "LISTEN_PORT",
    "HTTP_PORT",
    "LOG_LEVEL",
    "WORKERS",
    "IDLE_CONNECTION_TIMEOUT",
    "MAX_UPSTREAM_CHANNELS",
    "TERM_TIMEOUT",
    "TERM_CLIENT_CLOSE_TIMEOUT",
    "MAX_CLIENTS",
    "MAX_UPSTREAM_CONNECTIONS",
    "POOL_WAIT_TIMEOUT",
)


# ---------------------------------------------------------------------------------------------
# small utilities
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition not met",
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; return that value or fail."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            msg = message() if callable(message) else message
            if last_exc is not None:
                msg += f" (last error: {last_exc!r})"
            raise AssertionError(f"timed out after {timeout}s: {msg}")
        time.sleep(interval)


def reply_code_of(exc: BaseException) -> int | None:
    """The AMQP reply code carried by a pika (or raw) connection error, however it is wrapped.

    pika turns a Connection.Close received before OpenOk into ProbableAccessDeniedError /
    ProbableAuthenticationError whose only argument is the repr of ConnectionClosedByBroker,
    e.g. ``"ConnectionClosedByBroker: (403) 'ACCESS_REFUSED - ...'"``.
    """
    seen: set[int] = set()

    def walk(e: Any) -> int | None:
        if id(e) in seen:
            return None
        seen.add(id(e))
        if isinstance(e, pika.exceptions.ConnectionClosed):
            return int(e.reply_code)
        code = getattr(e, "reply_code", None)
        if isinstance(code, int):
            return code
        if isinstance(e, str):
            m = re.search(r"\((\d{3})\)", e)
            return int(m.group(1)) if m else None
        if isinstance(e, BaseException):
            for a in e.args:
                r = walk(a)
                if r is not None:
                    return r
            for nested in (e.__cause__, e.__context__):
                if nested is not None:
                    r = walk(nested)
                    if r is not None:
                        return r
        return None

    return walk(exc)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
class Metrics:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples.append((s.name, dict(s.labels), float(s.value)))

    def get(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
        total = 0.0
        for sname, slabels, value in self.samples:
            if sname == name and all(slabels.get(k) == v for k, v in labels.items()):
                total += value
        return total

    def has(self, name: str) -> bool:
        return any(s[0] == name for s in self.samples)

    def as_dict(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {(n, frozenset(lbl.items())): v for n, lbl, v in self.samples}


# metric names from the contract
CLIENT_CONNECTIONS = "amqproxy_client_connections"
UPSTREAM_CONNECTIONS = "amqproxy_upstream_connections"
PARKED_CHANNELS = "amqproxy_parked_channels"
LEASED_CHANNELS = "amqproxy_leased_channels"
UPSTREAM_CONNECTS = "amqproxy_upstream_connects_total"
UPSTREAM_CHANNEL_OPENS = "amqproxy_upstream_channel_opens_total"
CHANNEL_REUSES = "amqproxy_channel_reuses_total"
OUTBOX_MESSAGES = "amqproxy_outbox_messages"
