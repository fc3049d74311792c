"""One settings object, built from defaults < config file < environment < command line."""

from __future__ import annotations

import configparser
import dataclasses
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

log = logging.getLogger("amqproxy.config")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


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


def _upstream(value: str) -> str:
    parse_upstream(value)
    return value


@dataclass
class Settings:
    """Everything the proxy can be told. Field names are the config keys."""

    upstream: str = ""
    listen_address: str = "localhost"
    listen_port: int = 5673
    http_port: int = 15673
    log_level: str = "info"
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
    credential_ttl: float = 60.0  # how long a broker's "yes" to a password is trusted
    channel_max: int = 2047  # offered to clients
    max_client_buffer: int = 64 * 1024 * 1024
    outbox_hold: float = 30.0  # how long an unreachable broker is hidden from admitted clients
    outbox_max_bytes: int = 256 * 1024 * 1024  # unconfirmed messages held, at most
    upstream_ca: str = ""
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def upstream_host(self) -> str:
        return parse_upstream(self.upstream)[0]

    @property
    def upstream_port(self) -> int:
        return parse_upstream(self.upstream)[1]

    @property
    def upstream_tls(self) -> bool:
        return parse_upstream(self.upstream)[2]

    @property
    def upstream_address(self) -> str:
        return f"{self.upstream_host}:{self.upstream_port}"

    def upstream_ssl_context(self) -> ssl.SSLContext | None:
        if not self.upstream_tls:
            return None
        context = ssl.create_default_context(cafile=self.upstream_ca or None)
        return context

    def public(self) -> dict[str, Any]:
        """The settings as plain values (for --print-config and the status API)."""
        values = dataclasses.asdict(self)
        values.pop("sources")
        return values


# key -> parser of its text form
PARSERS: dict[str, Callable[[str], Any]] = {
    "upstream": _upstream,
    "listen_address": str,
    "listen_port": _port,
    "http_port": _port,
    "log_level": _log_level,
    "idle_connection_timeout": _seconds,
    "max_upstream_channels": _non_negative_int,
    "term_timeout": _seconds,
    "term_client_close_timeout": _seconds,
    "connect_timeout": _seconds,
    "handshake_timeout": _seconds,
    "heartbeat": _non_negative_int,
    "upstream_heartbeat": _optional_seconds,
    "park_channels": _bool,
    "credential_ttl": _seconds,
    "channel_max": _non_negative_int,
    "max_client_buffer": _non_negative_int,
    "outbox_hold": _seconds,
    "outbox_max_bytes": _non_negative_int,
    "upstream_ca": str,
}

# config file: (section, option) -> key
FILE_KEYS: dict[tuple[str, str], str] = {
    ("main", "upstream"): "upstream",
    ("main", "log_level"): "log_level",
    ("main", "idle_connection_timeout"): "idle_connection_timeout",
    ("main", "max_upstream_channels"): "max_upstream_channels",
    ("main", "term_timeout"): "term_timeout",
    ("main", "term_client_close_timeout"): "term_client_close_timeout",
    ("main", "connect_timeout"): "connect_timeout",
    ("main", "handshake_timeout"): "handshake_timeout",
    ("main", "heartbeat"): "heartbeat",
    ("main", "upstream_heartbeat"): "upstream_heartbeat",
    ("main", "park_channels"): "park_channels",
    ("main", "credential_ttl"): "credential_ttl",
    ("main", "max_client_buffer"): "max_client_buffer",
    ("main", "outbox_hold"): "outbox_hold",
    ("main", "outbox_max_bytes"): "outbox_max_bytes",
    ("main", "upstream_ca"): "upstream_ca",
    ("listen", "address"): "listen_address",
    ("listen", "bind"): "listen_address",
    ("listen", "port"): "listen_port",
    ("listen", "http_port"): "http_port",
}

ENV_KEYS: dict[str, str] = {
    "AMQP_URL": "upstream",
    "LISTEN_ADDRESS": "listen_address",
    "LISTEN_PORT": "listen_port",
    "HTTP_PORT": "http_port",
    "LOG_LEVEL": "log_level",
    "IDLE_CONNECTION_TIMEOUT": "idle_connection_timeout",
    "MAX_UPSTREAM_CHANNELS": "max_upstream_channels",
    "TERM_TIMEOUT": "term_timeout",
    "TERM_CLIENT_CLOSE_TIMEOUT": "term_client_close_timeout",
    "AMQPROXY_UPSTREAM_CA": "upstream_ca",
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


def _apply(settings: Settings, key: str, text: str, source: str) -> None:
    try:
        value = PARSERS[key](text)
    except ValueError as exc:
        raise ConfigError(f"{source}", f"bad value {text!r}: {exc}") from None
    setattr(settings, key, value)
    settings.sources[key] = source


def load(
    config_file: str | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, str | None],
) -> Settings:
    """Build the settings; ``overrides`` are the command-line values (None: not given)."""
    settings = Settings()
    if config_file:
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
            for option, text in parser.items(section):
                key = FILE_KEYS.get((section, option))
                if key is None:
                    raise ConfigError(f"[{section}] {option}", "unknown setting")
                _apply(settings, key, text, f"[{section}] {option}")
    for env_name, key in ENV_KEYS.items():
        if env_name in environ and environ[env_name] != "":
            _apply(settings, key, environ[env_name], env_name)
    for key, given in overrides.items():
        if given is not None:
            _apply(settings, key, given, f"--{key.replace('_', '-')}")
    if not settings.upstream:
        raise ConfigError(
            "upstream", "no upstream URL given (argument, AMQP_URL or [main] upstream)"
        )
    return settings


def warn_ignored_url_parts(settings: Settings) -> None:
    """Credentials and vhost come from each client; say so if the URL carries them."""
    ignored = parse_upstream(settings.upstream)[3]
    if ignored:
        log.warning(
            "the upstream URL's %s ignored: each client's own credentials and vhost are used",
            " and ".join(ignored) + (" is" if len(ignored) == 1 else " are"),
        )
