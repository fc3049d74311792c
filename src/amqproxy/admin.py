"""HTTP for operators: liveness and readiness, the admin API, Prometheus metrics.

A deliberately tiny HTTP/1.0 server (``httpd``) on the listen address. What the API answers
and does is ``api``'s; this module routes, checks the token of the write endpoints, and
collects the metrics.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from amqproxy import api
from amqproxy.api import Proxy
from amqproxy.httpd import HttpServer, Request, Response, error, json_response, unauthorized
from amqproxy.nodes import NodeCollector

log = logging.getLogger("amqproxy.admin")

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
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
        api.credit_traffic(registry)
        for labels, stats in registry.stats.items():
            for key, counter in counters.items():
                counter.add_metric(list(labels), getattr(stats, key))
        yield from counters.values()
        connecting = GaugeMetricFamily(
            "amqproxy_client_connections_total_open", "All client sockets, admitted or not"
        )
        connecting.add_metric([], len(self.proxy.clients))
        yield connecting
        accepted = CounterMetricFamily(
            "amqproxy_client_connections_accepted",
            "Client connections accepted (admitted or not) since start",
        )
        accepted.add_metric([], self.proxy.accepted)
        yield accepted
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
            for key, value in api.pool_counts(pool).items():
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


def _reason(body: bytes) -> str | Response:
    """The close reason of a request body: {"reason": "..."}, or nothing."""
    if not body.strip():
        return ""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return error(400, 'the body must be JSON: {"reason": "..."}')
    reason = value.get("reason", "") if isinstance(value, dict) else None
    if not isinstance(reason, str):
        return error(400, 'the body must be JSON: {"reason": "..."}')
    return "".join(ch for ch in reason if ch.isprintable())[:200]


class AdminServer:
    """The HTTP endpoint: GETs are open to whoever reaches it; POSTs need the admin token
    when one is set. A worker (``--workers``) serves it on a private unix socket that only
    its supervisor asks."""

    def __init__(self, proxy: Proxy, unix_path: str = "") -> None:
        self.proxy = proxy
        self.unix_path = unix_path
        self._http = HttpServer(self._answer)
        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(PoolCollector(proxy))
        self.metrics.register(NodeCollector(proxy.nodes))

    async def start(self) -> None:
        settings = self.proxy.settings
        if self.unix_path:
            await self._http.start("", 0, self.unix_path)
            return
        await self._http.start(settings.listen_address, settings.http_port)
        log.info(
            "HTTP endpoint on %s:%d (/healthz, /readyz, /metrics, /api)",
            settings.listen_address,
            settings.http_port,
        )
        warn_if_open(settings.admin_token, settings.listen_address, settings.http_port)

    async def stop(self) -> None:
        self._http.stop()

    async def _answer(self, request: Request) -> Response:
        return self.route(request)

    def route(self, request: Request) -> Response:
        method, path = request.method, request.path
        if method == "GET" and path in GETS:
            return self._get(path)
        if method == "POST" and (
            path in ("/api/pause", "/api/resume") or CLOSE_PATH.fullmatch(path)
        ):
            return self._post(request)
        if path in GETS or path in ("/api/pause", "/api/resume") or CLOSE_PATH.fullmatch(path):
            return error(405, f"{method} not allowed on {path}")
        return error(404, f"no endpoint {path}")

    def _get(self, path: str) -> Response:
        proxy = self.proxy
        if path == "/metrics":
            return Response(200, generate_latest(self.metrics), METRICS_TYPE)
        if path in ("/healthz", "/readyz"):
            ready, body = api.health(proxy)
            return json_response(200 if ready or path == "/healthz" else 503, body)
        views = {"/api/pools": api.pools, "/api/clients": api.clients, "/api/nodes": api.nodes}
        build = views.get(path, api.upstreams)
        return json_response(200, build(proxy))

    def _post(self, request: Request) -> Response:
        refused = unauthorized(request, self.proxy.settings.admin_token)
        if refused is not None:
            return refused
        if request.path in ("/api/pause", "/api/resume"):
            return json_response(
                200, api.set_paused(self.proxy, request.path == "/api/pause", request.peer)
            )
        reason = _reason(request.body)
        if isinstance(reason, Response):
            return reason
        match = CLOSE_PATH.fullmatch(request.path)
        assert match is not None
        done = api.close_client(self.proxy, int(match.group(1)), reason, request.peer)
        if done is None:
            return error(404, f"no client {match.group(1)}")
        return json_response(200, done)


def warn_if_open(token: str, address: str, port: int) -> None:
    """The WARNING of a start whose POST endpoints anyone who reaches the port can use."""
    if not token and not _loopback(address):
        log.warning(
            "the admin API's POST endpoints (close clients, pause) are open to anyone who "
            "reaches %s:%d: set --admin-token",
            address,
            port,
        )


def _loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
