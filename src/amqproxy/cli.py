"""The command line: ``amqproxy [options] amqp://broker[:port]``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from amqproxy import __version__, logsetup
from amqproxy.config import ConfigError, Settings, load, warn_ignored_url_parts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amqproxy",
        description="A pooling AMQP 0-9-1 proxy: clients connect here with their own "
        "credentials; upstream connections and clean channels are kept for the next client.",
    )
    add = parser.add_argument
    add("upstream", nargs="?", help="broker URL, amqp://host[:port] or amqps://host[:port]")
    add(
        "-l",
        "--listen",
        dest="listen_address",
        metavar="ADDRESS",
        help="address to listen on (default localhost)",
    )
    add("-p", "--port", dest="listen_port", metavar="PORT", help="AMQP port (default 5673)")
    add(
        "-b",
        "--http-port",
        dest="http_port",
        metavar="PORT",
        help="HTTP port for /metrics and /healthz (default 15673, 0 to disable)",
    )
    add(
        "-t",
        "--idle-connection-timeout",
        dest="idle_connection_timeout",
        metavar="SECONDS",
        help="close upstream connections unused for this long (default 5)",
    )
    add(
        "--max-upstream-channels",
        dest="max_upstream_channels",
        metavar="N",
        help="channels per upstream connection before another is opened (default: broker's)",
    )
    add(
        "--term-timeout",
        dest="term_timeout",
        metavar="SECONDS",
        help="on SIGTERM, how long closed clients get to answer (default 10)",
    )
    add(
        "--term-client-close-timeout",
        dest="term_client_close_timeout",
        metavar="SECONDS",
        help="on SIGTERM, how long clients may keep working before they are closed (default 5)",
    )
    add(
        "--connect-timeout",
        dest="connect_timeout",
        metavar="SECONDS",
        help="upstream TCP/TLS connect timeout (default 10)",
    )
    add(
        "--handshake-timeout",
        dest="handshake_timeout",
        metavar="SECONDS",
        help="AMQP handshake timeout on both legs (default 10)",
    )
    add(
        "--heartbeat",
        dest="heartbeat",
        metavar="SECONDS",
        help="heartbeat offered to clients (default 60, 0 disables)",
    )
    add(
        "--upstream-heartbeat",
        dest="upstream_heartbeat",
        metavar="SECONDS",
        help="heartbeat asked of the broker (default 6: a silent path is noticed within 15 s; "
        "'broker': the broker's proposal)",
    )
    add(
        "--no-park-channels",
        dest="park_channels",
        action="store_const",
        const="false",
        help="close every channel upstream when its client closes it (no reuse)",
    )
    add(
        "--credential-ttl",
        dest="credential_ttl",
        metavar="SECONDS",
        help="admit a client whose credentials the broker accepted this recently without "
        "asking it again (default 60; 0: the broker checks every client)",
    )
    add(
        "--upstream-ca",
        dest="upstream_ca",
        metavar="FILE",
        help="CA bundle to verify an amqps:// upstream",
    )
    add(
        "--max-client-buffer",
        dest="max_client_buffer",
        metavar="BYTES",
        help="bytes buffered toward a slow client before it is disconnected (default 64 MiB)",
    )
    add(
        "--outbox-hold",
        dest="outbox_hold",
        metavar="SECONDS",
        help="while the broker is unreachable, keep admitting clients it accepted recently and "
        "keep what they publish for this long (default 30; 0: refuse them at once)",
    )
    add(
        "--outbox-max-bytes",
        dest="outbox_max_bytes",
        metavar="BYTES",
        help="unconfirmed messages the proxy holds before it stops reading publishers "
        "(default 256 MiB)",
    )
    add("-d", "--debug", dest="debug", action="store_true", help="log at DEBUG level")
    add("-c", "--config", dest="config", metavar="FILE", help="INI file with [main] and [listen]")
    add("--print-config", action="store_true", help="print the effective settings and exit")
    add("--version", action="version", version=f"amqproxy {__version__}")
    return parser


def settings_from(argv: Sequence[str] | None) -> tuple[Settings, bool]:
    args = build_parser().parse_args(argv)
    overrides = {
        key: getattr(args, key)
        for key in (
            "upstream",
            "listen_address",
            "listen_port",
            "http_port",
            "idle_connection_timeout",
            "max_upstream_channels",
            "term_timeout",
            "term_client_close_timeout",
            "connect_timeout",
            "handshake_timeout",
            "heartbeat",
            "upstream_heartbeat",
            "park_channels",
            "upstream_ca",
            "credential_ttl",
            "max_client_buffer",
            "outbox_hold",
            "outbox_max_bytes",
        )
    }
    if args.debug:
        overrides["log_level"] = "debug"
    return load(args.config, os.environ, overrides), args.print_config


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed; the standard loop works too, more slowly."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":  # `amqproxy bench URL`: what the proxy gains here
        from amqproxy import benchcmd

        return benchcmd.main(list(argv[1:]))
    try:
        settings, print_only = settings_from(argv)
    except ConfigError as exc:
        print(f"amqproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    if print_only:
        print(json.dumps(settings.public(), indent=2, sort_keys=True))
        return 0
    logsetup.configure(settings.log_level, sys.stderr)
    warn_ignored_url_parts(settings)
    from amqproxy.server import Proxy

    try:
        _run(Proxy(settings).run())
    except OSError as exc:
        logging.getLogger("amqproxy").error("cannot start: %s", exc)
        return 1
    return 0
