"""The command line: ``amqproxy [options] amqp://broker[:port]``, and ``amqproxy status``."""

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
from amqproxy.config import BY_KEY, OPTIONS, ConfigError, Settings, load, warn_ignored_url_parts


def build_parser() -> argparse.ArgumentParser:
    """The options of config.OPTIONS, plus the URL argument and what only the command line has."""
    parser = argparse.ArgumentParser(
        prog="amqproxy",
        description="A pooling AMQP 0-9-1 proxy: clients connect here with their own "
        "credentials; upstream connections and clean channels are kept for the next client.",
        epilog="amqproxy status [--clients] [--upstreams] [--json] [--url URL] shows a running "
        "proxy's pools, clients or upstream connections (amqproxy status --help).",
    )
    parser.add_argument("upstream", nargs="?", help=BY_KEY["upstream"].help)
    for option in OPTIONS:
        if not option.flags:
            continue
        if option.const is not None:
            parser.add_argument(
                *option.flags, dest=option.key, action="store_const", const=option.const,
                help=option.help,
            )  # fmt: skip
        else:
            parser.add_argument(
                *option.flags, dest=option.key, metavar=option.metavar, help=option.help
            )
    add = parser.add_argument
    add("-d", "--debug", dest="debug", action="store_true", help="log at DEBUG level")
    add("-c", "--config", dest="config", metavar="FILE", help="INI file with [main] and [listen]")
    add("--print-config", action="store_true", help="print the effective settings and exit")
    add("--version", action="version", version=f"amqproxy {__version__}")
    return parser


def settings_from(argv: Sequence[str] | None) -> tuple[Settings, bool]:
    args = build_parser().parse_args(argv)
    overrides = {option.key: getattr(args, option.key, None) for option in OPTIONS}
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
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["status"]:  # no upstream URL is "status": the subcommand cannot be one
        from amqproxy import status

        return status.main(args[1:])
    try:
        settings, print_only = settings_from(args)
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
