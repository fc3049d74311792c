"""What the test suites share: the proxy process, the broker's side, a fault relay, a raw AMQP
client for exact frames, private broker nodes. ``tests/conftest.py`` puts ``tests/`` on the
path and loads the fixtures; bench/ imports the same modules."""

from support.broker import (
    GUEST,
    QueueHelper,
    Tenant,
    direct,
    drain,
    list_connections,
    list_consumers,
    queue_counts,
    rabbitmqctl,
)
from support.proxy import Proxy, ProxyError, run_proxy_cli
from support.relay import FaultRelay
from support.util import (
    BROKER_HOST,
    BROKER_PORT,
    BROKER_URL,
    CHANNEL_REUSES,
    CLIENT_CONNECTIONS,
    LEASED_CHANNELS,
    OUTBOX_MESSAGES,
    PARKED_CHANNELS,
    ROOT,
    UPSTREAM_CHANNEL_OPENS,
    UPSTREAM_CONNECTIONS,
    UPSTREAM_CONNECTS,
    Metrics,
    free_port,
    reply_code_of,
    wait_for,
)

__all__ = [
    "BROKER_HOST",
    "BROKER_PORT",
    "BROKER_URL",
    "CHANNEL_REUSES",
    "CLIENT_CONNECTIONS",
    "GUEST",
    "LEASED_CHANNELS",
    "OUTBOX_MESSAGES",
    "PARKED_CHANNELS",
    "ROOT",
    "UPSTREAM_CHANNEL_OPENS",
    "UPSTREAM_CONNECTIONS",
    "UPSTREAM_CONNECTS",
    "FaultRelay",
    "Metrics",
    "Proxy",
    "ProxyError",
    "QueueHelper",
    "Tenant",
    "direct",
    "drain",
    "free_port",
    "list_connections",
    "list_consumers",
    "queue_counts",
    "rabbitmqctl",
    "reply_code_of",
    "run_proxy_cli",
    "wait_for",
]
