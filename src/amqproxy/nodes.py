"""The upstream nodes: one ``broker.Broker`` per URL of the upstream list, their health, and
where a new upstream connection goes.

Placement: the healthy nodes first, the one with the fewest upstream connections of this proxy
first (least connections; the list's order breaks ties); a connect that fails marks its node
down and the same attempt goes on to the next node, so a client never waits for a probe to
learn that a node died. Nodes marked down are still tried after the healthy ones: the probe
that would bring one back may not have run yet, and with one URL that node is all there is.
The properties mirrored to clients are those of whichever node answered last.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from pamqp import commands
from prometheus_client.core import GaugeMetricFamily, Metric

from amqproxy import __version__
from amqproxy.amqp import auth, frames
from amqproxy.amqp import constants as c
from amqproxy.amqp.auth import Credentials
from amqproxy.broker import NOT_AMQP, REACHABLE, UNKNOWN, UNREACHABLE, Broker, Health, Login
from amqproxy.config import Settings
from amqproxy.core.upstream import UpstreamSession
from amqproxy.errors import UpstreamRefused
from amqproxy.pool import Pool

log = logging.getLogger("amqproxy.broker")
T = TypeVar("T")


class Nodes:
    """The brokers of the upstream list (a cluster's nodes, or the one broker)."""

    def __init__(self, settings: Settings, ssl_context: ssl.SSLContext | None) -> None:
        self.settings = settings
        self.ssl_context = ssl_context
        self.listed: dict[str, Broker] = {}  # by "host:port", in the list's order
        self.unlisted: dict[str, Broker] = {}  # a reload removed them; connections drain
        self.server_properties: dict[str, Any] | None = None  # of the node that answered last
        self.summary = Health(label="broker")  # with several nodes: any node answers?
        self._serials = itertools.count(1)
        self._interval = 0.0
        self._running = False  # checked at start: an event loop runs
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._start_cache: tuple[dict[str, Any], bytes] | None = None
        self._tune_cache: tuple[tuple[int, int, int], bytes] | None = None
        self.sync()

    # ---- the list -------------------------------------------------------------------------------

    def sync(self) -> set[str]:
        """Follow the upstream list of the settings (at start, and after a reload): a node
        kept keeps its health and connections; one added is checked at once (one URL
        replacing another keeps today's way: the health carries over until the next look);
        one no longer listed is watched no more. Returns the listed addresses."""
        before = dict(self.listed)
        listed: dict[str, Broker] = {}
        for host, port, _ in self.settings.upstream_nodes:
            name = f"{host}:{port}"
            broker = before.get(name)
            if broker is None:
                broker = self.unlisted.pop(name, None) or self._broker(host, port)
                if len(before) == 1 == len(self.settings.upstream_nodes):
                    _carry_over(next(iter(before.values())).health, broker.health)
                elif self._running:  # added by a reload: checked now, then watched
                    self._watch(broker, first=True)
            listed[name] = broker
        for name, broker in before.items():
            if name not in listed:
                self.unlisted[name] = broker
                watch = self._watches.pop(name, None)
                if watch is not None:
                    watch.cancel()
        for name, broker in listed.items():
            if self._interval and name not in self._watches:  # carried over, or listed again
                self._watch(broker, first=False)
        self.listed = listed
        several = len(listed) > 1
        for name, broker in listed.items():
            broker.health.label = f"broker node {name}" if several else "broker"
        if self._running:
            self._summarize()
        return set(listed)

    def _broker(self, host: str, port: int) -> Broker:
        broker = Broker(self.settings, self.ssl_context, host, port, self._serials)
        broker.learned = self._learned
        broker.health.listener = self._summarize
        return broker

    def reloaded(self, ssl_context: ssl.SSLContext | None) -> None:
        """SIGHUP: new upstream connections use the TLS context built from the files as they
        are now."""
        self.ssl_context = ssl_context
        for broker in [*self.listed.values(), *self.unlisted.values()]:
            broker.ssl_context = ssl_context

    @property
    def health(self) -> Health:
        """What ``/readyz`` follows: the node's own health when there is one, else whether
        any node answers."""
        if len(self.listed) == 1:
            return next(iter(self.listed.values())).health
        return self.summary

    def _summarize(self) -> None:
        if len(self.listed) < 2:
            return
        healths = [(name, broker.health) for name, broker in self.listed.items()]
        up = [name for name, health in healths if health.state == REACHABLE]
        if up:
            state, detail = REACHABLE, f"{len(up)} of {len(healths)} nodes answer"
        elif any(health.state == UNKNOWN for _, health in healths):
            state, detail = UNKNOWN, "not every node checked yet"
        else:
            wrong = all(health.state == NOT_AMQP for _, health in healths)
            state = NOT_AMQP if wrong else UNREACHABLE
            detail = "no node answers: " + "; ".join(f"{n}: {h.detail}" for n, h in healths)
        self.summary.record(state, detail)

    # ---- placement ------------------------------------------------------------------------------

    def order(self) -> list[Broker]:
        """Where to try a new upstream connection, best first: the healthy nodes by fewest
        connections, then those marked down, the one down the longest first."""
        brokers = list(self.listed.values())
        healthy = [b for b in brokers if b.health.state in (REACHABLE, UNKNOWN)]
        healthy.sort(key=lambda broker: len(broker.sessions))
        down = [b for b in brokers if b.health.state not in (REACHABLE, UNKNOWN)]
        down.sort(key=lambda broker: broker.health.since or 0.0)
        return healthy + down

    async def _first(self, attempt: Callable[[Broker], Awaitable[T]]) -> T:
        """``attempt`` on each node in placement order until one succeeds. A refusal of the
        credentials or vhost is the cluster's answer (its nodes share users): no next node."""
        failure: UpstreamRefused | None = None
        for broker in self.order():
            try:
                return await attempt(broker)
            except UpstreamRefused as exc:
                if exc.reachable and exc.code != c.CONNECTION_FORCED:
                    raise
                if failure is not None and len(self.listed) > 1:
                    log.debug("node %s failed too: %s", broker.name, exc.text)
                failure = failure or exc
        if failure is None:
            raise UpstreamRefused(c.CONNECTION_FORCED, "CONNECTION_FORCED - no upstream node")
        raise failure

    async def connect(self, pool: Pool) -> UpstreamSession:
        """A new upstream connection for ``pool`` on the best node that takes it
        (``broker.Broker.connect``)."""
        return await self._first(lambda broker: broker.connect(pool))

    async def login(self, credentials: Credentials, mechanism: str = "PLAIN") -> Login:
        """A login (``broker.Broker.login``) on the best node that takes it."""
        return await self._first(lambda broker: broker.login(credentials, mechanism))

    # ---- health ---------------------------------------------------------------------------------

    async def check(self) -> None:
        """Check every listed node at once (``broker.Broker.check``)."""
        self._running = True
        await asyncio.gather(*(broker.check() for broker in self.listed.values()))

    def watch(self, interval: float) -> None:
        """Check each node every ``interval`` seconds while no upstream connection to it is
        open (each node in a task of its own: a node that times out delays no other)."""
        self._interval = interval
        for broker in self.listed.values():
            self._watch(broker, first=False)

    def _watch(self, broker: Broker, first: bool) -> None:
        async def run() -> None:
            if first:
                await broker.check()
            if self._interval > 0:
                await broker.watch(self._interval)

        self._watches[broker.name] = asyncio.get_running_loop().create_task(
            run(), name=f"check {broker.name}"
        )

    def stop(self) -> None:
        for watch in self._watches.values():
            watch.cancel()
        self._watches.clear()

    def rows(self) -> list[dict[str, Any]]:
        """Every node, for ``GET /api/nodes``: address, state, since when, connections."""
        now, wall = asyncio.get_running_loop().time(), time.time()
        for name, broker in list(self.unlisted.items()):
            if not broker.sessions:
                del self.unlisted[name]
        out = []
        for listed, brokers in ((True, self.listed), (False, self.unlisted)):
            for name, broker in brokers.items():
                health = broker.health
                since = None if health.since is None else wall - (now - health.since)
                out.append(
                    {
                        "node": name,
                        "listed": listed,
                        "state": health.state,
                        "detail": health.detail,
                        "since": None if since is None else _iso(since),
                        "state_seconds": None if since is None else round(wall - since, 3),
                        "checked_seconds_ago": None
                        if health.checked_at is None
                        else round(max(now - health.checked_at, 0.0), 3),
                        "upstream_connections": broker.open_connections,
                    }
                )
        return out

    # ---- what clients are told of the broker ----------------------------------------------------

    def _learned(self, properties: dict[str, Any]) -> None:
        self.server_properties = properties

    async def properties(self) -> dict[str, Any]:
        """The broker's Connection.Start properties, learned once (from whichever node
        answers) and refreshed by upstreams; {} when no node can be reached (clients learn
        that at Connection.Open)."""
        if self.server_properties is not None:
            return self.server_properties
        for broker in self.order():
            properties = await broker.properties()
            if properties:
                return properties
        return {}

    def start_frame(self) -> bytes | None:
        """Connection.Start with the broker's properties, encoded once per change of them."""
        properties = self.server_properties
        if properties is None:
            return None
        if self._start_cache is None or self._start_cache[0] is not properties:
            start = commands.Connection.Start(
                version_major=0,
                version_minor=9,
                server_properties=properties,
                mechanisms=auth.MECHANISMS,
                locales="en_US",
            )
            self._start_cache = (properties, frames.encode_method(0, start))
        return self._start_cache[1]

    def fallback_start_frame(self) -> bytes:
        """Connection.Start when no node could be reached; Open will then fail (320)."""
        start = commands.Connection.Start(
            server_properties={"product": "amqproxy", "version": __version__},
            mechanisms=auth.MECHANISMS,
            locales="en_US",
        )
        return frames.encode_method(0, start)

    def tune_frame(self, frame_max: int) -> bytes:
        """Connection.Tune offering the broker's frame_max (known once an upstream tuned)."""
        settings = self.settings
        key = (settings.channel_max, frame_max, settings.heartbeat)
        if self._tune_cache is None or self._tune_cache[0] != key:
            self._tune_cache = (key, frames.encode_method(0, commands.Connection.Tune(*key)))
        return self._tune_cache[1]


def _carry_over(old: Health, new: Health) -> None:
    """What was known of the one broker, for the one that replaces it (as when one URL was
    all there could be): the next check or connection updates it."""
    new.state, new.detail, new.checked_at, new.since = (
        old.state,
        old.detail,
        old.checked_at,
        old.since,
    )


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


class NodeCollector:
    """Per node, at scrape time: whether it answers, and this proxy's connections to it."""

    def __init__(self, nodes: Nodes) -> None:
        self.nodes = nodes

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "amqproxy_node_up",
            "1 while the upstream node answers AMQP (last check, connect or loss), else 0",
            labels=["node"],
        )
        connections = GaugeMetricFamily(
            "amqproxy_node_upstream_connections",
            "Upstream connections of this proxy open to the node",
            labels=["node"],
        )
        for row in self.nodes.rows():
            up.add_metric([row["node"]], 1 if row["state"] == REACHABLE else 0)
            connections.add_metric([row["node"]], row["upstream_connections"])
        yield up
        yield connections
