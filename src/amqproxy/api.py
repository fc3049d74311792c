"""The admin API's answers: pools, clients, upstream connections and readiness as JSON, and
its two actions (close one client, pause and resume admission).

Everything is read from the live objects when asked; the hot path only counts (bytes per read
and write in ``io.client``, messages per scanner run in ``pool.PoolStats``). Pools are shown by
user and vhost, summed over the passwords in use: no password, and no key that holds one,
ever leaves here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any, Protocol

from amqproxy.amqp import constants as c
from amqproxy.broker import NOT_AMQP, REACHABLE, UNKNOWN, UNREACHABLE
from amqproxy.config import Settings
from amqproxy.io.client import ClientProtocol
from amqproxy.nodes import Nodes
from amqproxy.pool import Pool, PoolRegistry
from amqproxy.stats import PoolStats

log = logging.getLogger("amqproxy.admin")

Json = dict[str, Any]
CLOSED_BY_ADMIN = "closed by an operator (admin API)"


class Proxy(Protocol):
    """What the HTTP endpoints read of the proxy and act on (``server.Proxy``)."""

    settings: Settings
    registry: PoolRegistry
    nodes: Nodes
    draining: bool
    accepted: int  # client connections accepted since start

    @property
    def clients(self) -> Collection[ClientProtocol]:
        """Open client sockets, admitted or not."""

    @property
    def listening(self) -> bool:
        """The AMQP listener accepts connections."""

    @property
    def clients_refused(self) -> int:
        """Client connections refused at --max-clients, since start."""


def _seconds(value: float) -> float:
    return round(max(value, 0.0), 3)


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---- GET /api/pools ---------------------------------------------------------------------------


def pool_counts(pool: Pool) -> dict[str, int]:
    """What one pool holds now (``/api/pools``, the pool gauges of ``/metrics``)."""
    return {
        "clients": len(pool.clients),
        "upstreams": sum(1 for u in pool.upstreams if u.open),
        "parked": len(pool.parked),
        "leased": sum(u.leased for u in pool.upstreams),
        "settling": len(pool.settling),
        "waiting": len(pool.room),
    }


def credit_traffic(registry: PoolRegistry) -> None:
    """Every pool's byte totals catch up with its clients' (before they are reported)."""
    for pool in registry.pools.values():
        for client in pool.clients:
            client.credit_traffic()


def _pool_row(user: str, vhost: str, stats: PoolStats) -> Json:
    return {
        "user": user,
        "vhost": vhost,
        "clients": 0,
        "upstream_connections": 0,
        "channels": {"leased": 0, "parked": 0, "settling": 0},
        "waiting_channels": 0,
        "outage_held": False,
        "messages_in": stats.messages_in,
        "messages_out": stats.messages_out,
        "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out,
        "outbox": {"messages": 0, "bytes": 0, "oldest_seconds": 0.0},
    }


def pools(proxy: Proxy) -> Json:
    """Per user and vhost: the live pools' state and the totals kept since the start. A user
    and vhost the broker never accepted (a mistyped password) has no row."""
    registry = proxy.registry
    credit_traffic(registry)
    now = asyncio.get_running_loop().time()
    rows: dict[tuple[str, str], Json] = {}
    for (user, vhost), stats in registry.stats.items():
        if stats.connects:
            rows[(user, vhost)] = _pool_row(user, vhost, stats)
    for pool in registry.pools.values():
        key = (pool.user, pool.vhost)
        row = rows.get(key)
        if row is None:
            row = rows[key] = _pool_row(*key, pool.stats)
        counts = pool_counts(pool)
        row["clients"] += counts["clients"]
        row["upstream_connections"] += counts["upstreams"]
        for state in ("leased", "parked", "settling"):
            row["channels"][state] += counts[state]
        row["waiting_channels"] += pool.waiters
        row["outage_held"] = row["outage_held"] or pool.holding()
        messages, size, since = pool.delivery.counts()
        outbox = row["outbox"]
        outbox["messages"] += messages
        outbox["bytes"] += size
        if since is not None:
            outbox["oldest_seconds"] = max(outbox["oldest_seconds"], _seconds(now - since))
    return {"pools": [rows[key] for key in sorted(rows)], "paused": registry.paused}


# ---- GET /api/clients -------------------------------------------------------------------------


def clients(proxy: Proxy) -> Json:
    """Every client socket, admitted or still in its handshake (``state``)."""
    wall = time.time()
    out = []
    for client in sorted(proxy.clients, key=lambda client: client.id):
        session = client.session
        out.append(
            {
                "id": client.id,
                "address": client.peer,
                "user": session.user,
                "vhost": session.vhost,
                "connection_name": session.connection_name,
                "state": session.state.value,
                "channels": len(session.leases),
                "connected_since": _iso(client.connected_at),
                "connected_seconds": _seconds(wall - client.connected_at),
                "bytes_in": client.bytes_in,
                "bytes_out": client.bytes_out,
            }
        )
    return {"clients": out}


# ---- GET /api/upstreams -----------------------------------------------------------------------


def upstreams(proxy: Proxy) -> Json:
    """Every upstream connection: its pool, the broker address it went to (``node``), its
    role (publish or consume, ``roles``), its channels, its age and how long since the broker
    last sent anything (heartbeats included)."""
    now = asyncio.get_running_loop().time()
    out = []
    for pool in proxy.registry.pools.values():
        for conn in pool.upstreams:
            out.append(
                {
                    "name": conn.name,
                    "pool": f"{pool.user}@{pool.vhost}",
                    "user": pool.user,
                    "vhost": pool.vhost,
                    "node": conn.node or conn.remote,
                    "role": conn.role,
                    "local_address": conn.peer,
                    "open": conn.open,
                    "channels": len(conn.channels),
                    "leased": conn.leased,
                    "channel_max": conn.channel_max,
                    "heartbeat": conn.heartbeat,
                    "age_seconds": _seconds(now - conn.started),
                    "last_heartbeat_seconds": _seconds(now - conn.last_read),
                    "blocked": conn.blocked_reason,
                }
            )
    out.sort(key=lambda row: (row["pool"], row["name"]))
    return {"upstreams": out}


# ---- GET /api/nodes ---------------------------------------------------------------------------


def nodes(proxy: Proxy) -> Json:
    """Every node of the upstream list (and those a reload removed while connections to them
    drain): its state, since when, and this proxy's upstream connections to it."""
    return {"nodes": proxy.nodes.rows()}


# ---- /healthz and /readyz ---------------------------------------------------------------------


def _not_ready(proxy: Proxy) -> list[tuple[str, str]]:
    """Why the proxy should not get new clients now: (status word, reason), most urgent
    first; empty when it is ready."""
    health = proxy.nodes.health
    reasons = []
    if proxy.draining:
        reasons.append(("draining", "draining: shutting down"))
    elif not proxy.listening:
        reasons.append(("not listening", "not listening for clients"))
    if proxy.registry.paused:
        reasons.append(("paused", "paused: new clients are refused (POST /api/resume)"))
    if health.state == UNREACHABLE:
        reasons.append(("upstream unreachable", f"upstream unreachable: {health.detail}"))
    elif health.state == NOT_AMQP:
        reasons.append(("upstream is not an AMQP 0-9-1 broker", health.detail))
    elif health.state == UNKNOWN:
        reasons.append(("starting", "the broker has not been checked yet"))
    return reasons


def health(proxy: Proxy) -> tuple[bool, Json]:
    """(ready, the body of /healthz and /readyz): what was checked, and why it is not ready."""
    registry = proxy.registry
    broker = proxy.nodes.health
    now = asyncio.get_running_loop().time()
    not_ready = _not_ready(proxy)
    body: Json = {
        "status": not_ready[0][0] if not_ready else "ok",
        "ready": not not_ready,
        "reasons": [reason for _, reason in not_ready],
        "listening": proxy.listening,
        "draining": proxy.draining,
        "paused": registry.paused,
        "broker": {
            "state": broker.state,
            "reachable": broker.state == REACHABLE,
            "detail": broker.detail,
            "checked_seconds_ago": None
            if broker.checked_at is None
            else _seconds(now - broker.checked_at),
            "state_seconds": None if broker.since is None else _seconds(now - broker.since),
        },
        "clients": len(proxy.clients),
        "upstream_connections": registry.upstream_count,
        "upstream": proxy.settings.upstream_address,
        "nodes": proxy.nodes.rows(),
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
    return not not_ready, body


# ---- actions ----------------------------------------------------------------------------------


def close_client(proxy: Proxy, client_id: int, reason: str, who: str) -> Json | None:
    """Close one client with 320 and ``reason``; None when no client has that id."""
    for client in proxy.clients:
        if client.id == client_id:
            break
    else:
        return None
    session = client.session
    text = f"CONNECTION_FORCED - {reason or CLOSED_BY_ADMIN}"
    log.info("admin API (%s): closing client %d, %s", who, client_id, session.describe())
    session.close_with(c.CONNECTION_FORCED, text)
    return {"id": client_id, "closed": True, "reply_code": c.CONNECTION_FORCED, "reply_text": text}


def set_paused(proxy: Proxy, paused: bool, who: str) -> Json:
    """Pause: new clients are refused at Connection.Open, present ones keep working."""
    registry = proxy.registry
    if registry.paused != paused:
        registry.paused = paused
        if paused:
            log.warning("admin API (%s): paused: new clients are refused until resumed", who)
        else:
            log.info("admin API (%s): resumed: new clients are admitted", who)
    return {"paused": registry.paused, "clients": len(proxy.clients)}
