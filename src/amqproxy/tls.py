"""TLS contexts from the settings: the listener's for clients, the upstream one for the broker.

Built once at start, before anything listens: a file that is missing, unreadable, not PEM, an
encrypted key or a key that does not match its certificate is a ``ConfigError`` naming the
setting and the path (exit 2), not a traceback later on the first connection.
"""

from __future__ import annotations

import logging
import re
import ssl
from dataclasses import dataclass
from typing import Any

from amqproxy.config import BY_KEY, ConfigError, Settings

log = logging.getLogger("amqproxy.tls")


@dataclass(frozen=True)
class Contexts:
    """``client``: the TLS listener's (None: no TLS listener); ``upstream``: for an amqps://
    broker (None: amqp://)."""

    client: ssl.SSLContext | None
    upstream: ssl.SSLContext | None


def load(settings: Settings) -> Contexts:
    """Both contexts, every file checked; ConfigError names the first bad setting."""
    return Contexts(client_context(settings), upstream_context(settings))


def client_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's context: TLS 1.2 or later; with ``tls_client_ca``, a client certificate
    that CA signed is required (only that CA: the system's are not trusted for clients)."""
    if not (settings.tls_cert or settings.tls_key or settings.tls_client_ca):
        return None
    _require(settings, "tls_cert", "tls_key")
    _require(settings, "tls_key", "tls_cert")
    if settings.tls_client_ca and not settings.tls_cert:
        raise ConfigError(_where(settings, "tls_client_ca"), f"needs {_flag('tls_cert')}")
    if settings.tls_port == settings.listen_port and settings.tls_port != 0:
        raise ConfigError(
            _where(settings, "tls_port"),
            f"{settings.tls_port} is also the plain AMQP port ({_flag('listen_port')})",
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, settings, "tls_cert", "tls_key")
    if settings.tls_client_ca:
        _load_ca(context, settings, "tls_client_ca")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def upstream_context(settings: Settings) -> ssl.SSLContext | None:
    """For an amqps:// broker: its certificate is verified (``upstream_ca`` or the system's CAs)
    and must name the URL's host; with ``upstream_cert`` the proxy presents its own."""
    _require(settings, "upstream_cert", "upstream_key")
    _require(settings, "upstream_key", "upstream_cert")
    if not settings.upstream_tls:
        return None
    cafile = _ca_path(settings, "upstream_ca") if settings.upstream_ca else None
    try:  # CERT_REQUIRED and check_hostname; only upstream_ca when given, else the system's
        context = ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as exc:
        where = _where(settings, "upstream_ca")
        raise ConfigError(where, f"cannot load {cafile}: {describe(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.upstream_cert:
        _load_chain(context, settings, "upstream_cert", "upstream_key")
    return context


def subject(peercert: Any) -> str:
    """A client certificate's subject for logs, e.g. "CN=app1,O=Example"; "" for none."""
    if not isinstance(peercert, dict):
        return ""
    parts = [f"{_SHORT.get(k, k)}={v}" for rdn in peercert.get("subject", ()) for k, v in rdn]
    return ",".join(parts)


def describe(exc: BaseException) -> str:
    """An SSL error as one readable line (no "(_ssl.c:1006)", the verify message when there is
    one); other errors as their text."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    text = re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(exc))
    return text or type(exc).__name__


_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}


# ---- checking the files ---------------------------------------------------------------------


def _where(settings: Settings, key: str) -> str:
    """How the user gave the setting: the flag, the variable or the file key they used."""
    return settings.sources.get(key) or _flag(key)


def _flag(key: str) -> str:
    return BY_KEY[key].where


def _require(settings: Settings, key: str, needed_by: str) -> None:
    if getattr(settings, needed_by) and not getattr(settings, key):
        raise ConfigError(_flag(key), f"required with {_where(settings, needed_by)}")


def _read(settings: Settings, key: str) -> tuple[str, str]:
    """(path, text) of the file a setting names."""
    path = getattr(settings, key)
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return path, fh.read(1 << 20)
    except OSError as exc:
        raise ConfigError(_where(settings, key), f"cannot read {path}: {exc.strerror}") from None


def _ca_path(settings: Settings, key: str) -> str:
    """The path of a CA bundle, once it is known to be readable and to hold a certificate."""
    path, text = _read(settings, key)
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ConfigError(_where(settings, key), f"{path} holds no PEM certificate")
    return path


def _load_ca(context: ssl.SSLContext, settings: Settings, key: str) -> None:
    path = _ca_path(settings, key)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(_where(settings, key), f"cannot load {path}: {describe(exc)}") from None


class _Encrypted(Exception):
    """The key asked for a passphrase (OpenSSL would prompt on the terminal otherwise)."""


def _no_passphrase() -> str:
    raise _Encrypted


def _load_chain(context: ssl.SSLContext, settings: Settings, cert_key: str, key_key: str) -> None:
    cert, cert_text = _read(settings, cert_key)
    key, key_text = _read(settings, key_key)
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise ConfigError(_where(settings, cert_key), f"{cert} holds no PEM certificate")
    if "PRIVATE KEY-----" not in key_text:
        raise ConfigError(_where(settings, key_key), f"{key} holds no PEM private key")
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _Encrypted:
        raise ConfigError(
            _where(settings, key_key), f"{key} is encrypted: give a key without a passphrase"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            text = f"{key} is not the key of the certificate in {cert}"
        else:
            text = f"cannot load {cert} with {key}: {describe(exc)}"
        raise ConfigError(_where(settings, key_key), text) from None
