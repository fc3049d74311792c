"""``amqproxy status``: the admin API of a running proxy as aligned tables, like PgBouncer's
``SHOW POOLS`` (``--clients``, ``--upstreams``), or as JSON (``--json``).

It reads the API over HTTP, like any other client of it: nothing here touches the proxy's
process, and GETs need no token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from amqproxy.config import ConfigError, load

TIMEOUT = 5.0
Row = dict[str, Any]
# (header, how to read the cell from a row); numbers are right-aligned.
Column = tuple[str, Callable[[Row], object]]


class StatusError(Exception):
    """The proxy could not be asked, or did not answer as amqproxy does."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amqproxy status",
        description="Show a running proxy's pools (default), clients, upstream connections or "
        "upstream nodes.",
    )
    add = parser.add_argument
    add("--clients", action="store_true", help="list the client connections")
    add("--upstreams", action="store_true", help="list the upstream connections")
    add("--nodes", action="store_true", help="list the upstream nodes and their state")
    add("--json", action="store_true", help="print the API's JSON instead of tables")
    add("--url", help="the proxy's HTTP endpoint (default: http://ADDRESS:HTTP_PORT from the "
        "environment or -c FILE, else http://127.0.0.1:15673)")  # fmt: skip
    add("-c", "--config", metavar="FILE", help="the proxy's config file, for the default --url")
    return parser


def default_url(config_file: str | None, environ: Mapping[str, str]) -> str:
    """The HTTP endpoint of the proxy these settings describe, as seen from this host."""
    settings = load(config_file, environ, {"upstream": environ.get("AMQP_URL") or "amqp://x"})
    address = settings.listen_address
    address = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{settings.http_port}"


def fetch(base: str, path: str) -> Any:
    url = base.rstrip("/") + path
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            text = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code != 503:  # /readyz says "not ready" with 503 and a body
            raise StatusError(f"{url} answered {exc.code} {exc.reason}") from None
        text = exc.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach {url}: {reason}") from None
    try:
        return json.loads(text)
    except ValueError:
        raise StatusError(f"{url} did not answer JSON: is it amqproxy's HTTP port?") from None


# ---- tables -----------------------------------------------------------------------------------


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _open(is_open: object) -> str:
    return "open" if is_open else "closing"


POOLS: list[Column] = [
    ("user", lambda r: r["user"]),
    ("vhost", lambda r: r["vhost"]),
    ("clients", lambda r: r["clients"]),
    ("upstreams", lambda r: r["upstream_connections"]),
    ("leased", lambda r: r["channels"]["leased"]),
    ("parked", lambda r: r["channels"]["parked"]),
    ("settling", lambda r: r["channels"]["settling"]),
    ("waiting", lambda r: r["waiting_channels"]),
    ("msgs_in", lambda r: r["messages_in"]),
    ("msgs_out", lambda r: r["messages_out"]),
    ("bytes_in", lambda r: r["bytes_in"]),
    ("bytes_out", lambda r: r["bytes_out"]),
    ("outbox", lambda r: r["outbox"]["messages"]),
    ("outbox_bytes", lambda r: r["outbox"]["bytes"]),
]
CLIENTS: list[Column] = [
    ("id", lambda r: r["id"]),
    ("address", lambda r: r["address"]),
    ("user", lambda r: r["user"]),
    ("vhost", lambda r: r["vhost"]),
    ("name", lambda r: r["connection_name"]),
    ("state", lambda r: r["state"]),
    ("channels", lambda r: r["channels"]),
    ("since", lambda r: r["connected_since"]),
    ("bytes_in", lambda r: r["bytes_in"]),
    ("bytes_out", lambda r: r["bytes_out"]),
]
UPSTREAMS: list[Column] = [
    ("name", lambda r: r["name"]),
    ("pool", lambda r: r["pool"]),
    ("node", lambda r: r["node"]),
    ("role", lambda r: r["role"]),
    ("channels", lambda r: r["channels"]),
    ("leased", lambda r: r["leased"]),
    ("age", lambda r: _duration(r["age_seconds"])),
    ("last_heartbeat", lambda r: _duration(r["last_heartbeat_seconds"])),
    ("state", lambda r: f"blocked: {r['blocked']}" if r["blocked"] else _open(r["open"])),
]
NODES: list[Column] = [
    ("node", lambda r: r["node"]),
    ("state", lambda r: r["state"] if r["listed"] else f"{r['state']} (unlisted)"),
    ("since", lambda r: r["since"] or "-"),
    ("upstreams", lambda r: r["upstream_connections"]),
    ("detail", lambda r: r["detail"]),
]
VIEWS = {"pools": POOLS, "clients": CLIENTS, "upstreams": UPSTREAMS, "nodes": NODES}


def table(columns: list[Column], rows: list[Row]) -> str:
    """Aligned columns: text to the left, numbers to the right; "(none)" for no rows."""
    cells = [[read(row) for _, read in columns] for row in rows]
    widths = [len(header) for header, _ in columns]
    for line in cells:
        widths = [max(width, len(str(cell))) for width, cell in zip(widths, line, strict=True)]
    numeric = [all(isinstance(line[i], int | float) for line in cells) and bool(cells)
               for i in range(len(columns))]  # fmt: skip

    def render(values: Sequence[object]) -> str:
        out = []
        for value, width, right in zip(values, widths, numeric, strict=True):
            text = "" if value is None else str(value)
            out.append(text.rjust(width) if right else text.ljust(width))
        return "  ".join(out).rstrip()

    lines = [render([header for header, _ in columns])]
    lines += [render(line) for line in cells] or ["(none)"]
    return "\n".join(lines)


def summary(base: str, health: Row) -> str:
    """One line: ready or why not, the broker, the counts."""
    broker = health.get("broker", {})
    clients, upstreams = health.get("clients", 0), health.get("upstream_connections", 0)
    state = "ready" if health.get("ready") else "NOT READY: " + "; ".join(health.get("reasons", []))
    line = (
        f"amqproxy at {base}: {state}\n"
        f"upstream {health.get('upstream', '?')} {broker.get('state', '?')}, "
        f"{clients} client{'s' * (clients != 1)}, "
        f"{upstreams} upstream connection{'s' * (upstreams != 1)}"
    )
    if health.get("paused"):
        line += ", PAUSED"
    warnings = health.get("warnings") or []
    return line + "".join(f"\nwarning: {warning}" for warning in warnings)


def _rows(base: str, view: str) -> list[Row]:
    body = fetch(base, f"/api/{view}")
    rows = body.get(view) if isinstance(body, dict) else None
    if not isinstance(rows, list):
        raise StatusError(f"{base}/api/{view} did not answer as amqproxy's API does")
    return rows


def _show(base: str, health: Row, data: dict[str, list[Row]]) -> str:
    parts = [summary(base, health)]
    for view, rows in data.items():
        try:
            parts.append(table(VIEWS[view], rows))
        except (KeyError, TypeError):
            raise StatusError(f"{base}/api/{view}: rows of another version of amqproxy") from None
    return "\n\n".join(parts)


def main(argv: Sequence[str]) -> int:
    """Exit status 0 when the proxy answered (ready or not), 1 when it could not be asked,
    2 for a bad configuration."""
    args = build_parser().parse_args(argv)
    try:
        base = args.url or default_url(args.config, os.environ)
    except ConfigError as exc:
        print(f"amqproxy status: configuration error: {exc}", file=sys.stderr)
        return 2
    views = [view for view in ("clients", "upstreams", "nodes") if getattr(args, view)]
    views = views or ["pools"]
    try:
        health = fetch(base, "/readyz")
        if not isinstance(health, dict):
            raise StatusError(f"{base}/readyz did not answer as amqproxy does")
        data = {view: _rows(base, view) for view in views}
        text = json.dumps({"health": health, **data}, indent=2) if args.json else ""
        text = text or _show(base, health, data)
    except StatusError as exc:
        print(f"amqproxy status: {exc}", file=sys.stderr)
        return 1
    print(text)
    return 0
