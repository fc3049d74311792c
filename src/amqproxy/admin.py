"""HTTP for operators: GET /healthz and GET /metrics (Prometheus text format)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator, Sized
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from amqproxy.config import Settings
from amqproxy.pool import PoolRegistry

log = logging.getLogger("amqproxy.admin")

REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192


class Proxy(Protocol):
    """What the endpoints read of the proxy (``server.Proxy``)."""

    settings: Settings
    registry: PoolRegistry

    @property
    def clients(self) -> Sized:
        """Open client sockets, admitted or not."""

    draining: bool

    @property
    def clients_refused(self) -> int:
        """Client connections refused at --max-clients, since start."""


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


class AdminServer:
    """A deliberately tiny HTTP/1.0 server: two read-only endpoints."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(PoolCollector(proxy))
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        settings = self.proxy.settings
        self._server = await asyncio.start_server(
            self._handle, settings.listen_address, settings.http_port, reuse_address=True
        )
        log.info(
            "HTTP endpoint on %s:%d (/healthz, /metrics)",
            settings.listen_address,
            settings.http_port,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def health(self) -> tuple[int, dict[str, object]]:
        proxy = self.proxy
        registry = proxy.registry
        body: dict[str, object] = {
            "clients": len(proxy.clients),
            "upstream_connections": registry.upstream_count,
            "upstream": proxy.settings.upstream_address,
        }
        outbox = registry.outbox
        body["outbox"] = {
            "messages": outbox.messages,
            "bytes": outbox.bytes,
            "max_bytes": outbox.max_bytes,
        }
        warnings = []
        if outbox.bytes > outbox.max_bytes / 2:
            warnings.append("outbox over half full")
        held = registry.holding()
        if held:
            warnings.append(f"broker outage held for {held} pool(s)")
        if warnings:
            body["warnings"] = warnings
        if proxy.draining:
            body["status"] = "draining"
            return 503, body
        if registry.upstream_reachable is False and registry.upstream_count == 0:
            body["status"] = "upstream unreachable"
            return 503, body
        body["status"] = "ok"
        return 200, body

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            parts = request[:MAX_REQUEST].split(b"\r\n", 1)[0].split()
            method, path = (parts[0], parts[1].split(b"?")[0]) if len(parts) >= 2 else (b"", b"")
            if method != b"GET":
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif path == b"/metrics":
                status, ctype = 200, "text/plain; version=0.0.4; charset=utf-8"
                body = generate_latest(self.metrics)
            elif path == b"/healthz":
                status, info = self.health()
                ctype, body = "application/json", json.dumps(info).encode() + b"\n"
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            reason = {
                200: "OK",
                404: "Not Found",
                405: "Method Not Allowed",
                503: "Service Unavailable",
            }[status]
            writer.write(
                f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
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
