"""Health that tells the truth: ``/readyz`` follows the broker (checked at start and every
``--broker-check-interval``), draining and pausing; ``/healthz`` says the process is alive
with the same body; a server at the upstream address that is not AMQP is named as such, to
the operator and to the client."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pika
import pytest
from support import free_port, reply_code_of, wait_for


def readyz(p) -> tuple[int, dict]:
    status, text = p.http_get("/readyz")
    return status, json.loads(text)


def checked(p) -> tuple[int, dict]:
    """/readyz once the check at start is done (HTTP answers while it runs: "starting")."""
    wait_for(lambda: readyz(p)[1]["status"] != "starting", 10)
    return readyz(p)


class NotAMQPServer:
    """A TCP server at the "broker" address that answers like a web server."""

    ANSWER = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                self.accepted += 1
                conn.settimeout(2)
                try:
                    conn.recv(64)  # the protocol header
                    conn.sendall(self.ANSWER)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped = True
        self.thread.join(5)
        self.sock.close()


@pytest.mark.timeout(30)
def test_a_client_arriving_during_the_check_at_start_shares_its_socket(
    proxy_factory, fault_relay, tenant
):
    """The check at start and the first client's wait for the broker's properties are one
    look at the broker: with the broker's replies held back, the check is still under way when
    a client connects, and the broker sees one socket for both, not two."""
    fault_relay.hold_replies()
    p = proxy_factory("--broker-check-interval", "0", upstream=fault_relay.url, healthz=False)
    wait_for(lambda: fault_relay.accepted_total == 1, 5, message="the check at start")
    result: list[object] = []

    def publish() -> None:
        try:
            with p.connect(tenant) as conn:
                conn.channel().basic_publish("", "no-such-queue", b"x")
            result.append("ok")
        except Exception as exc:  # reported below
            result.append(exc)

    client = threading.Thread(target=publish, daemon=True)
    client.start()
    time.sleep(0.5)  # the client waits for Connection.Start, which waits for the check
    assert fault_relay.accepted_total == 1
    fault_relay.release_replies()
    client.join(10)
    assert result == ["ok"]
    assert fault_relay.accepted_total == 2  # the check (its answer the client's), the login


@pytest.mark.timeout(60)
def test_readyz_follows_the_broker_while_healthz_stays_alive(proxy_factory, fault_relay):
    fault_relay.mode = "refuse"  # accepts TCP and closes it: no AMQP answer
    p = proxy_factory("--broker-check-interval", "0.2", upstream=fault_relay.url)
    status, body = checked(p)
    assert status == 503 and body["ready"] is False
    assert body["status"] == "upstream unreachable"
    assert body["broker"]["state"] == "unreachable"
    # The relay closes at once: "closed the connection before Connection.Start", or a reset
    # when our protocol header reached it first.
    [reason] = body["reasons"]
    assert reason.startswith("upstream unreachable: "), reason
    assert "closed the connection" in reason or "reset" in reason, reason
    status, alive = p.http_get("/healthz")
    assert status == 200 and json.loads(alive)["broker"]["state"] == "unreachable"

    fault_relay.mode = "forward"
    wait_for(lambda: readyz(p)[0] == 200, 10, message="/readyz never became ready")
    status, body = readyz(p)
    assert (body["status"], body["ready"], body["reasons"]) == ("ok", True, [])
    assert body["broker"]["reachable"] is True and body["listening"] is True

    fault_relay.mode = "refuse"  # no client, no upstream connection: only the check notices
    wait_for(lambda: readyz(p)[0] == 503, 10, message="/readyz missed the broker going away")
    assert p.http_get("/healthz")[0] == 200
    assert wait_for(lambda: "broker answers AMQP again" in p.log(), 5)
    assert p.log().count("broker unreachable: ") == 2  # once per change, not once per check


@pytest.mark.timeout(60)
def test_readyz_at_start_with_nothing_listening_at_the_upstream_address(proxy_factory):
    p = proxy_factory("--connect-timeout", "2", upstream=f"amqp://127.0.0.1:{free_port()}")
    status, body = checked(p)
    assert status == 503 and body["status"] == "upstream unreachable"
    assert body["reasons"][0].startswith("upstream unreachable: ")
    assert body["broker"]["checked_seconds_ago"] is not None


@pytest.mark.timeout(60)
def test_readyz_is_false_while_draining(proxy_factory, tenant):
    p = proxy_factory("--term-client-close-timeout", "20")
    stays = p.connect(tenant)
    assert checked(p)[0] == 200
    p.send_signal(signal.SIGTERM)
    wait_for(lambda: readyz(p)[0] == 503, 5, message="/readyz still ready while draining")
    _, body = readyz(p)
    assert body["status"] == "draining" and body["draining"] is True
    assert p.http_get("/healthz")[0] == 200
    stays.close()
    assert p.wait_exit(15) == 0


@pytest.mark.timeout(60)
def test_an_upstream_that_is_not_amqp_is_named_as_such(proxy_factory, tenant):
    server = NotAMQPServer()
    try:
        p = proxy_factory(
            "--broker-check-interval", "0.2", "--outbox-hold", "0",
            upstream=f"amqp://127.0.0.1:{server.port}",
        )  # fmt: skip
        status, body = checked(p)
        assert status == 503 and body["status"] == "upstream is not an AMQP 0-9-1 broker"
        assert body["broker"]["state"] == "not-amqp"
        assert body["reasons"] == [
            "upstream is not an AMQP 0-9-1 broker (it answered 'HTTP/1.1 400 Bad Request')"
        ]

        t0 = time.monotonic()
        with pytest.raises(pika.exceptions.AMQPConnectionError) as refused:
            p.connect(tenant)
        assert time.monotonic() - t0 < 5
        assert reply_code_of(refused.value) == 320
        assert "upstream is not an AMQP 0-9-1 broker" in str(refused.value)
        log = p.log()
        assert "upstream is not an AMQP 0-9-1 broker (it answered 'HTTP/1.1 400" in log
        assert "FRAME_ERROR" not in log and "frame" not in log.lower().replace("frame scanner", "")
    finally:
        server.close()
