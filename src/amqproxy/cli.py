"""The command line: ``amqproxy [options] amqp://broker[:port]``, and ``amqproxy status``."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from amqproxy import __version__, logsetup
from amqproxy.config import BY_KEY, OPTIONS, ConfigError, Settings, load, warnings


def build_parser() -> argparse.ArgumentParser:
    """The options of config.OPTIONS, plus the URL argument and what only the command line has."""
    parser = argparse.ArgumentParser(
        prog="amqproxy",
        description="A pooling AMQP 0-9-1 proxy: clients connect here with their own "
        "credentials; upstream connections and clean channels are kept for the next client.",
        epilog="amqproxy status [--clients] [--upstreams] [--json] [--url URL] shows a running "
        "proxy's pools, clients or upstream connections (amqproxy status --help).",
    )
    parser.add_argument("upstream", nargs="*", help=BY_KEY["upstream"].help)
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
    # A worker of --workers N: set by its supervisor, never by hand.
    add("--worker-index", type=int, help=argparse.SUPPRESS)
    add("--worker-of", type=int, help=argparse.SUPPRESS)
    add("--worker-admin", default="", help=argparse.SUPPRESS)
    return parser


def loader_from(argv: Sequence[str] | None) -> tuple[Callable[[], Settings], bool]:
    """What builds the settings from this command line (again on SIGHUP: the same config
    file, environment and command-line values, which keep their precedence), and whether
    only --print-config was asked."""
    args = build_parser().parse_args(argv)
    overrides = {option.key: getattr(args, option.key, None) for option in OPTIONS}
    overrides["upstream"] = ",".join(args.upstream) or None  # several URLs: a cluster's nodes
    if args.debug:
        overrides["log_level"] = "debug"
    return functools.partial(load, args.config, dict(os.environ), overrides), args.print_config


def settings_from(argv: Sequence[str] | None) -> tuple[Settings, bool]:
    loader, print_only = loader_from(argv)
    return loader(), print_only


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed; the standard loop works too, more slowly."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def _serve(
    settings: Settings, contexts: Any, loader: Callable[[], Settings], args: list[str]
) -> int:
    """One process (the default), a supervisor (--workers N), or one of its workers."""
    hidden = build_parser().parse_args(args)
    if hidden.worker_index is not None:
        from amqproxy.server import Proxy, WorkerRole
        from amqproxy.supervisor import bind_to_supervisor

        if not bind_to_supervisor(hidden.worker_of):
            return 1  # its supervisor is gone already
        admin = hidden.worker_admin  # "@name": the abstract unix socket "\0name"
        role = WorkerRole(hidden.worker_index, "\0" + admin[1:] if admin[:1] == "@" else admin)
        _run(Proxy(settings, contexts, loader, role).run())
        return 0
    if settings.workers > 1:
        from amqproxy.supervisor import Supervisor

        return asyncio.run(Supervisor(settings, args, loader).run())
    from amqproxy.server import Proxy

    _run(Proxy(settings, contexts, loader).run())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bench"]:  # `amqproxy bench URL`: what the proxy gains here
        from amqproxy import benchcmd

        return benchcmd.main(args[1:])
    if args[:1] == ["status"]:  # no upstream URL is "status": the subcommand cannot be one
        from amqproxy import status

        return status.main(args[1:])
    try:
        loader, print_only = loader_from(args)
        settings = loader()
    except ConfigError as exc:
        print(f"amqproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    if print_only:
        for warning in warnings(settings):
            print(f"amqproxy: warning: {warning}", file=sys.stderr)
        print(json.dumps(settings.public(), indent=2, sort_keys=True))
        return 0
    from amqproxy import tls

    try:
        contexts = tls.load(settings)  # every certificate and key file, before anything starts
    except ConfigError as exc:
        print(f"amqproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    worker = _worker_index(args)
    tag = f"worker {worker}" if worker is not None else "supervisor" * (settings.workers > 1)
    logsetup.configure(settings.log_level, sys.stderr, settings.log_format, tag)
    if worker is None:  # a worker's supervisor said it already
        for warning in warnings(settings):
            logging.getLogger("amqproxy").warning("%s", warning)
    try:
        return _serve(settings, contexts, loader, args)
    except OSError as exc:
        logging.getLogger("amqproxy").error("cannot start: %s", exc)
        return 1


def _worker_index(args: list[str]) -> int | None:
    index: int | None = build_parser().parse_args(args).worker_index
    return index
