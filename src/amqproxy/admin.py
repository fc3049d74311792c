"""HTTP for operators: liveness and readiness, the admin API, Prometheus metrics.

A deliberately tiny HTTP/1.0 server on the listen address: one request per connection, each
read and write within a timeout, bodies bounded. What the API answers and does is ``api``'s;
this module routes, checks the token of the write endpoints, and collects the metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from amqproxy import api
from amqproxy.api import Proxy
from amqproxy.nodes import NodeCollector

log = logging.getLogger("amqproxy.admin")

REQUEST_TIMEOUT = 5.0
MAX_HEAD = 8192
MAX_BODY = 4096
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    503: "Service Unavailable",
}
GETS = {"/healthz", "/readyz", "/metrics", "/api/pools", "/api/clients", "/api/upstreams",
        "/api/nodes"}  # fmt: skip
CLOSE_PATH = re.compile(r"/api/clients/(\d{1,18})/close")


# Per (user, vhost), read from the pools at scrape time: key, metric name, help.
POOL_GAUGES = (
    ("clients", "amqproxy_client_connections", "Client connections admitted"),
    ("upstreams", "amqproxy_upstream_connections", "Open upstream connections"),
    ("parked", "amqproxy_parked_channels", "Clean upstream channels waiting for a client"),
    ("leased", "amqproxy_leased_channels", "Upstream channels leased to clients"),
    (
        "settling",
        "amqproxy_settling_channels",
        "Released channels waiting for replies or confirms before parking",
    ),
    (
        "outbox_messages",
        "amqproxy_outbox_messages",
        "Messages the proxy answered for that the broker has not confirmed yet",
    ),
    ("outbox_bytes", "amqproxy_outbox_bytes", "Bytes of the messages in the outbox"),
    (
        "waiting",
        "amqproxy_channels_waiting",
        "Channel.Open waiting for an upstream channel at --max-upstream-connections",
    ),
    (
        "oldest",
        "amqproxy_outbox_oldest_seconds",
        "Age of the oldest unconfirmed message in the outbox (0 when empty)",
    ),
)
# Per (user, vhost), from ``pool.PoolStats`` (kept after a pool is gone).
POOL_COUNTERS = (
    ("connects", "amqproxy_upstream_connects", "Upstream connections opened"),
    (
        "connect_failures",
        "amqproxy_upstream_connect_failures",
        "Upstream connection attempts that failed or were refused",
    ),
    ("channel_opens", "amqproxy_upstream_channel_opens", "Channel.Open sent upstream"),
    ("channel_reuses", "amqproxy_channel_reuses", "Client channels served by a parked channel"),
    (
        "consumer_moves",
        "amqproxy_consumer_moves",
        "Client channels moved to a consume connection when they began to consume",
    ),
    (
        "orphan_channel_errors",
        "amqproxy_orphan_channel_errors",
        "Channel errors that arrived after their client had left",
    ),
    (
        "replayed",
        "amqproxy_messages_replayed",
        "Messages published again after their upstream channel or connection died",
    ),
    (
        "refused",
        "amqproxy_messages_refused",
        "Messages the proxy answered for that the broker refused (nack or channel error)",
    ),
    (
        "channel_waits",
        "amqproxy_channel_waits",
        "Channel.Open that waited for an upstream channel at --max-upstream-connections",
    ),
    (
        "channel_wait_seconds",
        "amqproxy_channel_wait_seconds",
        "Seconds Channel.Open spent waiting for an upstream channel, together",
    ),
    (
        "channel_wait_timeouts",
        "amqproxy_channel_wait_timeouts",
        "Channel.Open refused (506) after --pool-wait-timeout without a free channel",
    ),
    ("messages_in", "amqproxy_messages_published", "Messages clients published"),
    (
        "messages_out",
        "amqproxy_messages_delivered",
        "Messages delivered to clients (Basic.Deliver and Basic.GetOk)",
    ),
    ("bytes_in", "amqproxy_client_received_bytes", "Bytes read from clients"),
    ("bytes_out", "amqproxy_client_sent_bytes", "Bytes written to clients"),
)
LABELS = ["user", "vhost"]


class PoolCollector:
    """Reads the pools at scrape time: the hot path never touches a metric."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        yield from self._pool_gauges()
        registry = self.proxy.registry
        counters = {key: CounterMetricFamily(n, h, labels=LABELS) for key, n, h in POOL_COUNTERS}
        for labels, stats in registry.stats.items():
            for key, counter in counters.items():
                counter.add_metric(list(labels), getattr(stats, key))
        yield from counters.values()
        connecting = GaugeMetricFamily(
            "amqproxy_client_connections_total_open", "All client sockets, admitted or not"
        )
        connecting.add_metric([], len(self.proxy.clients))
        yield connecting
        refused = CounterMetricFamily(
            "amqproxy_client_connections_refused",
            "Client connections refused at --max-clients (Connection.Close 320)",
        )
        refused.add_metric([], self.proxy.clients_refused)
        yield refused
        full = CounterMetricFamily(
            "amqproxy_outbox_full_seconds",
            "Seconds the outbox spent at its limit (publishers held back)",
        )
        full.add_metric([], registry.outbox.full_seconds)
        yield full

    def _pool_gauges(self) -> Iterator[Metric]:
        """Summed over the pools of each (user, vhost): one per password in use."""
        now = asyncio.get_running_loop().time()
        rows: dict[tuple[str, str], dict[str, float]] = {}
        for pool in self.proxy.registry.pools.values():
            row = rows.setdefault((pool.user, pool.vhost), {key: 0 for key, _, _ in POOL_GAUGES})
            for key, value in pool.counts().items():
                row[key] += value
            messages, size, since = pool.delivery.counts()
            row["outbox_messages"] += messages
            row["outbox_bytes"] += size
            if since is not None:
                row["oldest"] = max(row["oldest"], now - since)
        for key, name, help_text in POOL_GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=LABELS)
            for labels, row in rows.items():
                family.add_metric(list(labels), row[key])
            yield family


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


def _json(status: int, value: object) -> Response:
    return Response(status, json.dumps(value, indent=1).encode() + b"\n")


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


async def _read_request(reader: asyncio.StreamReader, peer: str) -> Request | Response:
    """The request line, the two headers that matter and the body (bounded, timed)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
    if len(head) > MAX_HEAD:
        return _error(413, "request head too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) < 2:
        return _error(400, "bad request line")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    try:
        length = int(headers.get("content-length") or 0)
    except ValueError:
        return _error(400, "bad Content-Length")
    if not 0 <= length <= MAX_BODY:
        return _error(413, f"body over {MAX_BODY} bytes")
    body = await asyncio.wait_for(reader.readexactly(length), REQUEST_TIMEOUT) if length else b""
    path = parts[1].split("?")[0]
    return Request(parts[0], path, headers.get("authorization", ""), body, peer)


def _reason(body: bytes) -> str | Response:
    """The close reason of a request body: {"reason": "..."}, or nothing."""
    if not body.strip():
        return ""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _error(400, 'the body must be JSON: {"reason": "..."}')
    reason = value.get("reason", "") if isinstance(value, dict) else None
    if not isinstance(reason, str):
        return _error(400, 'the body must be JSON: {"reason": "..."}')
    return "".join(ch for ch in reason if ch.isprintable())[:200]


class AdminServer:
    """The HTTP endpoint: GETs are open to whoever reaches it; POSTs need the admin token
    when one is set."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(PoolCollector(proxy))
        self.metrics.register(NodeCollector(proxy.nodes))
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        settings = self.proxy.settings
        self._server = await asyncio.start_server(
            self._handle, settings.listen_address, settings.http_port, reuse_address=True
        )
        log.info(
            "HTTP endpoint on %s:%d (/healthz, /readyz, /metrics, /api)",
            settings.listen_address,
            settings.http_port,
        )
        if not settings.admin_token and not _loopback(settings.listen_address):
            log.warning(
                "the admin API's POST endpoints (close clients, pause) are open to anyone who "
                "reaches %s:%d: set --admin-token",
                settings.listen_address,
                settings.http_port,
            )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def route(self, request: Request) -> Response:
        method, path = request.method, request.path
        if method == "GET" and path in GETS:
            return self._get(path)
        if method == "POST" and (
            path in ("/api/pause", "/api/resume") or CLOSE_PATH.fullmatch(path)
        ):
            return self._post(request)
        if path in GETS or path in ("/api/pause", "/api/resume") or CLOSE_PATH.fullmatch(path):
            return _error(405, f"{method} not allowed on {path}")
        return _error(404, f"no endpoint {path}")

    def _get(self, path: str) -> Response:
        proxy = self.proxy
        if path == "/metrics":
            return Response(
                200, generate_latest(self.metrics), "text/plain; version=0.0.4; charset=utf-8"
            )
        if path in ("/healthz", "/readyz"):
            ready, body = api.health(proxy)
            return _json(200 if ready or path == "/healthz" else 503, body)
        views = {"/api/pools": api.pools, "/api/clients": api.clients, "/api/nodes": api.nodes}
        build = views.get(path, api.upstreams)
        return _json(200, build(proxy))

    def _post(self, request: Request) -> Response:
        token = self.proxy.settings.admin_token
        if token and not hmac.compare_digest(
            request.authorization.encode("latin-1"), f"Bearer {token}".encode()
        ):
            response = _error(401, "this endpoint needs Authorization: Bearer <admin token>")
            response.extra = 'WWW-Authenticate: Bearer realm="amqproxy"\r\n'
            return response
        if request.path in ("/api/pause", "/api/resume"):
            return _json(
                200, api.set_paused(self.proxy, request.path == "/api/pause", request.peer)
            )
        reason = _reason(request.body)
        if isinstance(reason, Response):
            return reason
        match = CLOSE_PATH.fullmatch(request.path)
        assert match is not None
        done = api.close_client(self.proxy, int(match.group(1)), reason, request.peer)
        if done is None:
            return _error(404, f"no client {match.group(1)}")
        return _json(200, done)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        who = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        try:
            request = await _read_request(reader, who)
            response = request if isinstance(request, Response) else self.route(request)
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


def _loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
