"""The HTTP plumbing of the admin endpoints: a deliberately tiny HTTP/1.0 server (one request
per connection, each read and write within a timeout, bodies bounded) and the client the
supervisor asks its workers with, over their private unix sockets.

What is answered is the router's business (``admin.AdminServer`` in a proxy process,
``supervisor_http.SupervisorHttp`` in a supervisor); this module only moves requests and
responses.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

REQUEST_TIMEOUT = 5.0
MAX_HEAD = 8192
MAX_BODY = 4096
MAX_ANSWER = 64 * 1024 * 1024  # a worker's answer (its /api/clients with many clients)
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
# Who called, as the supervisor tells a worker (its socket's peer is only the supervisor).
FORWARDED = "x-amqproxy-caller"


@dataclass
class Request:
    method: str
    path: str
    authorization: str
    body: bytes
    peer: str


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    extra: str = ""  # more header lines, each ending with CRLF


def json_response(status: int, value: object) -> Response:
    return Response(status, json.dumps(value, indent=1).encode() + b"\n")


def error(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


def unauthorized(request: Request, token: str) -> Response | None:
    """The 401 of a write endpoint when an admin token is set and the request lacks it."""
    if not token or hmac.compare_digest(
        request.authorization.encode("latin-1"), f"Bearer {token}".encode()
    ):
        return None
    response = error(401, "this endpoint needs Authorization: Bearer <admin token>")
    response.extra = 'WWW-Authenticate: Bearer realm="amqproxy"\r\n'
    return response


def _headers(lines: list[str]) -> dict[str, str]:
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


async def read_request(
    reader: asyncio.StreamReader, peer: str, trust_forwarded: bool = False
) -> Request | Response:
    """The request line, the headers that matter and the body (bounded, timed)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
    if len(head) > MAX_HEAD:
        return error(413, "request head too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) < 2:
        return error(400, "bad request line")
    headers = _headers(lines[1:])
    try:
        length = int(headers.get("content-length") or 0)
    except ValueError:
        return error(400, "bad Content-Length")
    if not 0 <= length <= MAX_BODY:
        return error(413, f"body over {MAX_BODY} bytes")
    body = await asyncio.wait_for(reader.readexactly(length), REQUEST_TIMEOUT) if length else b""
    path = parts[1].split("?")[0]
    if trust_forwarded and headers.get(FORWARDED):
        peer = f"{headers[FORWARDED]} via the supervisor"
    return Request(parts[0], path, headers.get("authorization", ""), body, peer)


class HttpServer:
    """Serves ``answer`` on a TCP address or (a worker's private endpoint) a unix socket."""

    def __init__(self, answer: Callable[[Request], Awaitable[Response]]) -> None:
        self.answer = answer
        self._server: asyncio.Server | None = None
        self._unix = False

    async def start(self, host: str, port: int, unix_path: str = "") -> None:
        if unix_path:
            self._unix = True
            self._server = await asyncio.start_unix_server(self._handle, unix_path)
            if not unix_path.startswith("\0"):  # a file: the proxy's user alone
                os.chmod(unix_path, 0o600)
        else:
            self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        who = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        try:
            request = await read_request(reader, who, trust_forwarded=self._unix)
            response = request if isinstance(request, Response) else await self.answer(request)
            writer.write(
                f"HTTP/1.0 {response.status} {REASONS[response.status]}\r\n"
                f"Content-Type: {response.content_type}\r\n"
                f"Content-Length: {len(response.body)}\r\n{response.extra}"
                "Connection: close\r\n\r\n".encode()
                + response.body
            )
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()


async def ask(
    unix_path: str,
    method: str,
    path: str,
    within: float,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One request to a worker's private endpoint: (status, body). OSError, TimeoutError or
    ValueError when it does not answer as ours does ``within`` seconds."""
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_unix_connection(unix_path, limit=MAX_HEAD)
        try:
            extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
            writer.write(
                f"{method} {path} HTTP/1.0\r\nHost: worker\r\nContent-Length: {len(body)}\r\n"
                f"{extra}\r\n".encode("latin-1")
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length = int(_headers(lines[1:]).get("content-length") or 0)
            if not 0 <= length <= MAX_ANSWER:
                raise ValueError(f"answer of {length} bytes")
            return status, await reader.readexactly(length)
        finally:
            writer.close()
