"""What the proxy counts per (user, vhost): monotonic totals that survive the pools they were
counted in (metrics, the admin API)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolStats:
    """Monotonic counters per (user, vhost), kept after a pool is gone."""

    connects: int = 0
    connect_failures: int = 0
    channel_opens: int = 0
    channel_reuses: int = 0
    consumer_moves: int = 0  # client channels moved to a consume connection (``roles``)
    orphan_channel_errors: int = 0
    replayed: int = 0  # messages published again after their channel or connection died
    refused: int = 0  # messages the broker refused (nack or channel error) for a client that
    #                   did not select confirms: logged, never retried
    channel_waits: int = 0  # Channel.Open that waited at --max-upstream-connections
    channel_wait_seconds: float = 0.0  # how long they waited, together
    channel_wait_timeouts: int = 0  # ... and got no channel within --pool-wait-timeout
    # Clients' traffic: bytes counted per read and write, messages per scanner run.
    bytes_in: int = 0  # read from clients
    bytes_out: int = 0  # written to clients
    messages_in: int = 0  # published by clients
    messages_out: int = 0  # delivered to clients (Basic.Deliver, Basic.GetOk)
