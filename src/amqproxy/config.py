"""One settings object, built from defaults < config file < environment < command line."""

from __future__ import annotations

import configparser
import dataclasses
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

log = logging.getLogger("amqproxy.config")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
MAX_WORKERS = 256


class ConfigError(Exception):
    """A setting has a bad value; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("must be between 0 and 65535")
    return port


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def _seconds(value: str) -> float:
    number = float(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def _optional_seconds(value: str) -> int | None:
    return None if value in ("", "broker") else _non_negative_int(value)


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _log_level(value: str) -> str:
    lowered = value.strip().lower()
    if lowered not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return lowered


def _log_format(value: str) -> str:
    lowered = value.strip().lower()
    if lowered not in ("text", "json"):
        raise ValueError("must be text or json")
    return lowered


def _workers(value: str) -> int:
    if value.strip().lower() == "auto":
        return os.cpu_count() or 1
    number = int(value)
    if not 1 <= number <= MAX_WORKERS:
        raise ValueError(f"must be between 1 and {MAX_WORKERS}, or auto")
    return number


def _upstream(value: str) -> str:
    """One broker URL, or several (the nodes of a cluster), separated by commas or white
    space; kept as given (one URL: exactly as before lists existed)."""
    nodes(value)
    return value


def upstream_urls(value: str) -> list[str]:
    """The URLs of an ``upstream`` setting, in their order."""
    return [url for url in re.split(r"[\s,]+", value.strip()) if url]


def nodes(value: str) -> list[tuple[str, int, bool]]:
    """(host, port, tls) of each URL of ``value``. They share one TLS setting (the context,
    the CA, the client certificate), so amqp:// and amqps:// do not mix; an address listed
    twice would count twice in placement."""
    urls = upstream_urls(value)
    if not urls:
        raise ValueError("no URL")
    found = [parse_upstream(url)[:3] for url in urls]
    if len({tls for _, _, tls in found}) > 1:
        raise ValueError("mixes amqp:// and amqps:// URLs: all nodes share one TLS setting")
    seen: set[tuple[str, int]] = set()
    for host, port, _ in found:
        if (host, port) in seen:
            raise ValueError(f"lists {host}:{port} twice")
        seen.add((host, port))
    return found


@dataclass
class Settings:
    """Everything the proxy can be told. Field names are the config keys."""

    upstream: str = ""
    listen_address: str = "localhost"
    listen_port: int = 5673
    http_port: int = 15673
    log_level: str = "info"
    log_format: str = "text"
    idle_connection_timeout: float = 5.0
    max_upstream_channels: int = 0  # 0: the broker's channel_max
    term_timeout: float = 10.0
    term_client_close_timeout: float = 5.0
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    heartbeat: int = 60  # offered to clients
    # Upstream connections are shared and long-lived: a dead path must be noticed quickly
    # (2 to 2.5 intervals of silence); None: the broker's proposal (RabbitMQ's is 60 s).
    upstream_heartbeat: int | None = 6
    park_channels: bool = True
    split_consumers: bool = True  # consuming channels on upstream connections of their own
    credential_ttl: float = 60.0  # how long a broker's "yes" to a password is trusted
    channel_max: int = 2047  # offered to clients
    max_client_buffer: int = 64 * 1024 * 1024
    outbox_hold: float = 30.0  # how long an unreachable broker is hidden from admitted clients
    outbox_max_bytes: int = 256 * 1024 * 1024  # unconfirmed messages held, at most
    upstream_ca: str = ""
    upstream_cert: str = ""  # client certificate for mutual TLS with the broker
    upstream_key: str = ""
    tls_cert: str = ""  # set: a TLS listener for clients on tls_port
    tls_key: str = ""
    tls_port: int = 5671
    tls_client_ca: str = ""  # set: clients must present a certificate this CA signed
    max_clients: int = 0  # client connections served at once; 0: no limit
    max_upstream_connections: int = 0  # per pool; 0: no limit
    pool_wait_timeout: float = 10.0  # how long Channel.Open waits at that limit
    admin_token: str = ""  # the admin API's POST endpoints require it, when set
    broker_check_interval: float = 5.0  # seconds between checks that the broker answers
    workers: int = 1  # processes sharing the listen ports; more than 1: a supervisor runs them
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def upstream_nodes(self) -> list[tuple[str, int, bool]]:
        """(host, port, tls) of every node of the upstream list."""
        return nodes(self.upstream)

    @property
    def upstream_host(self) -> str:
        return self.upstream_nodes[0][0]

    @property
    def upstream_port(self) -> int:
        return self.upstream_nodes[0][1]

    @property
    def upstream_tls(self) -> bool:
        return self.upstream_nodes[0][2]

    @property
    def upstream_address(self) -> str:
        """host:port of each node, comma-separated."""
        return ", ".join(f"{host}:{port}" for host, port, _ in self.upstream_nodes)

    def public(self) -> dict[str, Any]:
        """The settings as plain values (for --print-config and the status API); the
        upstream URL without the credentials it may carry."""
        values = dataclasses.asdict(self)
        values.pop("sources")
        urls = [redacted(url) for url in upstream_urls(self.upstream)]
        values["upstream"] = urls[0] if len(urls) == 1 else urls
        if values["admin_token"]:
            values["admin_token"] = "(set)"  # a secret: never printed
        return values


@dataclass(frozen=True)
class Option:
    """One setting: how it is parsed and where it can be given. ``key`` is the Settings field;
    the file key is ``[section] file_key`` (the key itself by default)."""

    key: str
    parse: Callable[[str], Any]
    help: str
    flags: tuple[str, ...] = ()  # command-line flags; () for none
    env: str = ""  # environment variable; "" for none
    section: str = "main"
    file_keys: tuple[str, ...] = ()  # () -> (key,)
    metavar: str = "SECONDS"
    const: str | None = None  # a flag without a value sets this text (--no-park-channels)
    reloadable: bool = True  # SIGHUP applies a new value; False: it needs a restart

    @property
    def names_in_file(self) -> tuple[str, ...]:
        return self.file_keys or (self.key,)

    @property
    def where(self) -> str:
        """How a user names it: the command-line flags, e.g. "-p/--port"."""
        return "/".join(self.flags) or f"[{self.section}] {self.names_in_file[0]}"


# Every setting, once: the command line, the environment and the config file are made from it.
OPTIONS: tuple[Option, ...] = (
    Option("upstream", _upstream,
           "broker URL, amqp://host[:port] or amqps://host[:port]; several (the nodes of a "
           "cluster: separate arguments, or separated by commas)", env="AMQP_URL", metavar="URL"),
    Option("listen_address", str, "address to listen on (default localhost)", ("-l", "--listen"),
           "LISTEN_ADDRESS", "listen", ("address", "bind"), "ADDRESS", reloadable=False),
    Option("listen_port", _port, "AMQP port (default 5673)", ("-p", "--port"), "LISTEN_PORT",
           "listen", ("port",), "PORT", reloadable=False),
    Option("http_port", _port,
           "HTTP port for /metrics, /healthz, /readyz and /api (default 15673, 0 disables)",
           ("-b", "--http-port"), "HTTP_PORT", "listen", ("http_port",), "PORT", reloadable=False),
    Option("log_level", _log_level, f"log level, one of {', '.join(LOG_LEVELS)} (default info)",
           ("--log-level",), "LOG_LEVEL", metavar="LEVEL"),
    Option("log_format", _log_format,
           "log lines as text (default) or json: one object per line with the event, client "
           "address, user, vhost, connection name, pool and reason", ("--log-format",),
           "LOG_FORMAT", metavar="FORMAT"),
    Option("idle_connection_timeout", _seconds,
           "close upstream connections unused for this long (default 5; 0 never)",
           ("-t", "--idle-connection-timeout"), "IDLE_CONNECTION_TIMEOUT"),
    Option("max_upstream_channels", _non_negative_int,
           "channels per upstream connection before another is opened (default: broker's)",
           ("--max-upstream-channels",), "MAX_UPSTREAM_CHANNELS", metavar="N"),
    Option("term_timeout", _seconds,
           "on SIGTERM, how long closed clients get to answer, and the outbox to be delivered "
           "(default 10)", ("--term-timeout",), "TERM_TIMEOUT"),
    Option("term_client_close_timeout", _seconds,
           "on SIGTERM, how long clients may keep working before they are closed (default 5)",
           ("--term-client-close-timeout",), "TERM_CLIENT_CLOSE_TIMEOUT"),
    Option("connect_timeout", _seconds, "upstream TCP/TLS connect timeout (default 10)",
           ("--connect-timeout",)),
    Option("handshake_timeout", _seconds, "AMQP handshake timeout on both legs (default 10)",
           ("--handshake-timeout",)),
    Option("heartbeat", _non_negative_int,
           "heartbeat offered to clients (default 60, 0 disables)", ("--heartbeat",)),
    Option("upstream_heartbeat", _optional_seconds,
           "heartbeat asked of the broker (default 6: a silent path is noticed within 15 s; "
           "'broker': the broker's proposal)", ("--upstream-heartbeat",)),
    Option("park_channels", _bool,
           "close every channel upstream when its client closes it (no reuse)",
           ("--no-park-channels",), const="false"),
    Option("split_consumers", _bool,
           "keep consuming channels on the publish connections instead of moving them to "
           "upstream connections of their own (fewer broker connections)",
           ("--no-split-consumers",), const="false"),
    Option("credential_ttl", _seconds,
           "admit a client whose credentials the broker accepted this recently without asking "
           "it again (default 60; 0: the broker checks every client)", ("--credential-ttl",)),
    Option("channel_max", _non_negative_int,
           "channels per connection offered to clients (default 2047)", ("--channel-max",),
           metavar="N"),
    Option("max_client_buffer", _non_negative_int,
           "bytes buffered toward a slow client before it is disconnected (default 64 MiB)",
           ("--max-client-buffer",), metavar="BYTES"),
    Option("outbox_hold", _seconds,
           "while the broker is unreachable, keep admitting clients it accepted recently and "
           "keep what they publish for this long (default 30; 0: refuse them at once)",
           ("--outbox-hold",)),
    Option("outbox_max_bytes", _non_negative_int,
           "unconfirmed messages the proxy holds before it stops reading publishers "
           "(default 256 MiB)", ("--outbox-max-bytes",), metavar="BYTES"),
    Option("upstream_ca", str, "CA bundle to verify an amqps:// upstream", ("--upstream-ca",),
           "AMQPROXY_UPSTREAM_CA", metavar="FILE"),
    Option("upstream_cert", str, "client certificate (PEM) for mutual TLS with an amqps:// "
           "upstream", ("--upstream-cert",), "AMQPROXY_UPSTREAM_CERT", metavar="FILE"),
    Option("upstream_key", str, "private key (PEM) of --upstream-cert", ("--upstream-key",),
           "AMQPROXY_UPSTREAM_KEY", metavar="FILE"),
    Option("tls_cert", str, "certificate (PEM, chain) of a TLS listener for clients",
           ("--tls-cert",), "AMQPROXY_TLS_CERT", "listen", metavar="FILE"),
    Option("tls_key", str, "private key (PEM) of --tls-cert", ("--tls-key",),
           "AMQPROXY_TLS_KEY", "listen", metavar="FILE"),
    Option("tls_port", _port, "AMQPS port, with --tls-cert (default 5671)", ("--tls-port",),
           "AMQPROXY_TLS_PORT", "listen", metavar="PORT", reloadable=False),
    Option("tls_client_ca", str, "CA bundle: TLS clients must present a certificate it signed",
           ("--tls-client-ca",), "AMQPROXY_TLS_CLIENT_CA", "listen", metavar="FILE"),
    Option("max_clients", _non_negative_int,
           "client connections served at once; the next one is refused with Connection.Close "
           "320 (default 0: no limit)", ("--max-clients",), "MAX_CLIENTS", metavar="N"),
    Option("max_upstream_connections", _non_negative_int,
           "upstream connections per pool (user, password, vhost); at the limit Channel.Open "
           "waits for a channel to be freed (default 0: no limit)",
           ("--max-upstream-connections",), "MAX_UPSTREAM_CONNECTIONS", metavar="N"),
    Option("pool_wait_timeout", _seconds,
           "how long Channel.Open waits for a channel at --max-upstream-connections before "
           "the channel gets 506 RESOURCE_ERROR (default 10)", ("--pool-wait-timeout",),
           "POOL_WAIT_TIMEOUT"),
    Option("admin_token", str,
           "token the admin API's POST endpoints require (Authorization: Bearer TOKEN); "
           "default none: they are open to whoever reaches the HTTP port",
           ("--admin-token",), "AMQPROXY_ADMIN_TOKEN", metavar="TOKEN"),
    Option("broker_check_interval", _seconds,
           "seconds between checks that each broker node answers AMQP, for /readyz (default 5; "
           "0: only at start and by upstream connections)", ("--broker-check-interval",)),
    Option("workers", _workers,
           "worker processes sharing the listen ports (SO_REUSEPORT), run by a supervisor "
           "that restarts them and serves the HTTP port for all (default 1: one process; "
           "auto: one per core)", ("--workers",), "WORKERS", metavar="N", reloadable=False),
)  # fmt: skip
BY_KEY = {option.key: option for option in OPTIONS}
_BY_FILE_KEY = {
    (option.section, name): option for option in OPTIONS for name in option.names_in_file
}


def parse_upstream(url: str) -> tuple[str, int, bool, list[str]]:
    """(host, port, tls, ignored parts) of an amqp:// or amqps:// URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"{url!r} is not an amqp:// or amqps:// URL")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    tls = parts.scheme == "amqps"
    try:
        port = parts.port or (5671 if tls else 5672)
    except ValueError:
        raise ValueError(f"{url!r} has a bad port") from None
    ignored = []
    if parts.username or parts.password:
        ignored.append("credentials")
    if unquote(parts.path.lstrip("/")):
        ignored.append("vhost")
    return parts.hostname, port, tls, ignored


def _apply(settings: Settings, option: Option, text: str, source: str) -> None:
    try:
        value = option.parse(text)
    except ValueError as exc:
        raise ConfigError(source, f"bad value {text!r}: {exc}") from None
    setattr(settings, option.key, value)
    settings.sources[option.key] = source


def _read_file(settings: Settings, config_file: str) -> None:
    parser = configparser.ConfigParser()
    try:
        with open(config_file, encoding="utf-8") as fh:
            parser.read_file(fh)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {config_file}: {exc.strerror}") from None
    except configparser.Error as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError("config", f"{config_file}: {first_line}") from None
    for section in parser.sections():
        for name, text in parser.items(section):
            option = _BY_FILE_KEY.get((section, name))
            if option is None:
                raise ConfigError(f"[{section}] {name}", "unknown setting")
            _apply(settings, option, text, f"[{section}] {name}")


def load(
    config_file: str | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, str | None],
) -> Settings:
    """Build the settings; ``overrides`` are the command-line values by key (None: not given)."""
    settings = Settings()
    if config_file:
        _read_file(settings, config_file)
    for option in OPTIONS:
        if option.env and environ.get(option.env, "") != "":
            _apply(settings, option, environ[option.env], option.env)
    for key, given in overrides.items():
        if given is not None:
            option = BY_KEY[key]
            _apply(settings, option, given, option.where if option.flags else "URL argument")
    if not settings.upstream:
        raise ConfigError(
            "upstream", "no upstream URL given (argument, AMQP_URL or [main] upstream)"
        )
    return settings


def changes(old: Settings, new: Settings) -> list[tuple[Option, Any, Any]]:
    """The settings whose values differ, in the table's order (what a reload changes)."""
    return [
        (option, getattr(old, option.key), getattr(new, option.key))
        for option in OPTIONS
        if getattr(old, option.key) != getattr(new, option.key)
    ]


def shown(key: str, value: Any) -> str:
    """A setting's value for a log line: the upstream URL without credentials or vhost."""
    if key == "upstream":
        return ", ".join(
            f"{'amqps' if tls else 'amqp'}://{host}:{port}" for host, port, tls in nodes(value)
        )
    if isinstance(value, float):
        return f"{value:g}"
    return "''" if value == "" else str(value)


def redacted(url: str) -> str:
    """``url`` without user and password."""
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=host).geturl()


def warnings(settings: Settings) -> list[str]:
    """What a start says about the settings at WARNING (--print-config prints the same):
    URL parts the proxy does not use, TLS settings that do nothing (upstream files with
    amqp://, a TLS port without a certificate)."""
    found = []
    ignored = sorted(
        {part for url in upstream_urls(settings.upstream) for part in parse_upstream(url)[3]}
    )
    if ignored:
        what = " and ".join(ignored) + (" is" if len(ignored) == 1 else " are")
        found.append(
            f"the upstream URL's {what} ignored: each client's own credentials and vhost are used"
        )
    upstream_files = ("upstream_ca", "upstream_cert", "upstream_key")
    tls_files = [key for key in upstream_files if getattr(settings, key)]
    if tls_files and not settings.upstream_tls:
        names = ", ".join(settings.sources.get(key) or BY_KEY[key].where for key in tls_files)
        found.append(f"{names} ignored: the upstream URL is amqp:// (amqps:// for TLS)")
    if "tls_port" in settings.sources and not settings.tls_cert:
        found.append(f"{settings.sources['tls_port']} ignored: no TLS listener without --tls-cert")
    return found
