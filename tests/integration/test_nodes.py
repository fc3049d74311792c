"""Several upstream nodes: the proxy given the URLs of a RabbitMQ cluster places new upstream
connections on healthy nodes (least connections), fails over within one attempt when a node
stops, replays what the stopped node did not confirm on another one, takes the node back once
a probe finds it answering, and stays ready while any node answers.

The cluster is the tests' own: three private nodes on their own ports, clustered with
``join_cluster`` (``support.node.BrokerCluster``), started once for the module; never the
shared broker.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import pika
import pytest
from support import wait_for
from support.broker import Tenant, drain
from support.node import BrokerCluster, BrokerNode
from support.proxy import Proxy, run_proxy_cli
from support.relay import FaultRelay
from support.util import free_port

CONNECT_TIMEOUT = 5.0  # --connect-timeout of the proxies here: no client may wait longer
USERS = {f"nodes-{i}": f"pw-{uuid.uuid4().hex[:10]}" for i in range(7)}


@pytest.fixture(scope="module")
def cluster() -> Iterator[BrokerCluster]:
    started = BrokerCluster(f"amqproxy-nodes-{os.getpid()}").start()
    try:
        started.add_users(USERS)
        yield started
    finally:
        started.stop()


def tenant(index: int) -> Tenant:
    user = f"nodes-{index}"
    return Tenant(user, USERS[user], "/")


def start_proxy(proxy_factory, urls: list[str], *extra: str) -> Proxy:
    """A proxy given every URL as an argument of its own, checking nodes every second."""
    args = ["-t", "60", "--broker-check-interval", "1", "--connect-timeout",
            str(CONNECT_TIMEOUT), "--handshake-timeout", "2", *extra, *urls]  # fmt: skip
    return proxy_factory(*args, upstream=None)


def api(p: Proxy, path: str) -> dict:
    status, text = p.http_get(path)
    assert status in (200, 503), text
    return json.loads(text)


def node_states(p: Proxy) -> dict[str, str]:
    return {row["node"]: row["state"] for row in api(p, "/api/nodes")["nodes"]}


def nodes_of(p: Proxy, user: str) -> list[str]:
    """The nodes the pool of ``user`` has open upstream connections to."""
    rows = api(p, "/api/upstreams")["upstreams"]
    return [row["node"] for row in rows if row["user"] == user and row["open"]]


def address(node: BrokerNode) -> str:
    return f"127.0.0.1:{node.plain_port}"


def declare_quorum_queue(node: BrokerNode) -> str:
    name = f"nodes-qq-{uuid.uuid4().hex[:8]}"
    params = pika.ConnectionParameters("127.0.0.1", node.plain_port)
    with pika.BlockingConnection(params) as conn:
        conn.channel().queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
    return name


class PublisherLoop(threading.Thread):
    """Connect, publish one persistent message, close, again: what a PHP-FPM worker does. A
    message counts as handed over when its client's Connection.Close got CloseOk."""

    def __init__(self, p: Proxy, who: Tenant, queue: str) -> None:
        super().__init__(daemon=True)
        self.params = p.params(who.user, who.password, who.vhost, stack_timeout=30)
        self.queue = queue
        self.stopping = threading.Event()
        # (started, seconds, body, error or None), in order
        self.cycles: list[tuple[float, float, str, str | None]] = []

    def run(self) -> None:
        count = 0
        while not self.stopping.is_set():
            count += 1
            body = f"m-{count}"
            started = time.monotonic()
            error = None
            try:
                conn = pika.BlockingConnection(self.params)
                channel = conn.channel()
                props = pika.BasicProperties(delivery_mode=2)
                channel.basic_publish("", self.queue, body.encode(), props)
                conn.close()
            except Exception as exc:
                error = repr(exc)
            self.cycles.append((started, time.monotonic() - started, body, error))
            time.sleep(0.01)

    def ok_since(self, since: float) -> int:
        return sum(1 for start, _, _, error in self.cycles if start >= since and error is None)

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


def test_a_publisher_loop_rides_out_a_node_stopping_and_starting(cluster, proxy_factory):
    """One node (the one carrying the pool) is stopped and started again under a publisher
    loop: no cycle waits longer than --connect-timeout, every cycle begun after the stop
    succeeds (on the other nodes), /readyz stays ready, and every message handed over is in
    the quorum queue at the end."""
    queue = declare_quorum_queue(cluster.nodes[0])
    who = tenant(0)
    p = start_proxy(proxy_factory, cluster.urls)
    loop = PublisherLoop(p, who, queue)
    loop.start()
    try:
        wait_for(lambda: loop.ok_since(0) >= 20, 20, message="the loop never got going")
        carrying = nodes_of(p, who.user)
        assert len(carrying) == 1, carrying
        victim = next(n for n in cluster.nodes if address(n) == carrying[0])
        victim.stop_app()
        stopped = time.monotonic()
        assert node_states(p)[address(victim)] == "unreachable"
        assert p.http_get("/readyz")[0] == 200  # two nodes answer
        wait_for(lambda: loop.ok_since(stopped) >= 30, 30, message="no cycle after the stop")
        assert address(victim) not in nodes_of(p, who.user)
        assert nodes_of(p, who.user), "the pool has no connection to the other nodes"
        victim.start_app()
        wait_for(lambda: node_states(p)[address(victim)] == "reachable", 15)
        back = time.monotonic()
        wait_for(lambda: loop.ok_since(back) >= 20, 20, message="no cycle after the start")
    finally:
        loop.stop()
    after_stop = [c for c in loop.cycles if c[0] >= stopped]
    assert [c for c in after_stop if c[3] is not None] == [], "a client failed after the stop"
    slowest = max(seconds for _, seconds, _, _ in loop.cycles)
    assert slowest < CONNECT_TIMEOUT, f"a client waited {slowest:.2f}s"
    handed_over = {body for _, _, body, error in loop.cycles if error is None}
    wait_for(lambda: api(p, "/readyz")["outbox"]["messages"] == 0, 30)
    guest = Tenant("guest", "guest", "/", cluster.nodes[0].plain_port)
    bodies = {body.decode() for body, _, _ in drain(guest, queue)}
    missing = handed_over - bodies
    assert not missing, f"{len(missing)} of {len(handed_over)} handed-over messages lost"
    assert_marked_down_by_its_320(p.log(), address(victim))


def assert_marked_down_by_its_320(log: str, node: str) -> None:
    """The node was marked down no later than the 320 its shutdown sent on the pool's
    connection: by that 320 itself, or by whatever saw it go first (a refused connect in the
    window where the node has closed its listener but not yet its connections; a check), never
    by a check some time after the 320 arrived."""
    lines = log.splitlines()
    shutdown = "320 CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
    closed = [i for i, line in enumerate(lines) if shutdown in line and "upstream" in line]
    down = [i for i, line in enumerate(lines) if f"broker node {node} unreachable: " in line]
    assert closed, f"no upstream connection closed by the node's 320:\n{log}"
    assert down and down[0] < closed[0], f"{node} not marked down by its 320:\n{log}"


def test_a2_what_a_dying_node_did_not_confirm_is_replayed_on_another(cluster, proxy_factory):
    """The race made to happen: the node carrying the pool (behind a relay of the tests')
    has taken messages whose confirms are held back when it stops. The connection is lost,
    the node is marked down, and the messages are published again on another node: every
    handed-over message is in the quorum queue, some of them replayed."""
    victim = cluster.nodes[0]
    queue = declare_quorum_queue(victim)
    who = tenant(3)
    relay = FaultRelay(("127.0.0.1", victim.plain_port)).start()
    relayed = f"127.0.0.1:{relay.port}"
    p = start_proxy(proxy_factory, [relay.url, *cluster.urls[1:]])
    loop = PublisherLoop(p, who, queue)
    loop.start()
    try:
        wait_for(lambda: loop.ok_since(0) >= 10, 20, message="the loop never got going")
        assert nodes_of(p, who.user) == [relayed]
        relay.hold_replies()  # the node's confirms (and heartbeats) stop reaching the proxy
        wait_for(lambda: api(p, "/readyz")["outbox"]["messages"] >= 10, 10)
        victim.stop_app()
        stopped = time.monotonic()
        relay.release_replies()  # for the probes once it is back
        wait_for(lambda: node_states(p)[relayed] == "unreachable", 5)
        wait_for(lambda: loop.ok_since(stopped) >= 20, 30, message="no cycle after the stop")
        assert relayed not in nodes_of(p, who.user)
    finally:
        loop.stop()
        victim.start_app()
        relay.close()
    # A client caught mid-call by the loss may get the 320 of today (it was not handed over).
    assert [c for c in loop.cycles if c[0] >= stopped and c[3] is not None] == []
    handed_over = {body for _, _, body, error in loop.cycles if error is None}
    wait_for(lambda: api(p, "/readyz")["outbox"]["messages"] == 0, 30)
    assert p.metric("amqproxy_messages_replayed_total", user=who.user, vhost="/") >= 10
    guest = Tenant("guest", "guest", "/", cluster.nodes[1].plain_port)
    bodies = {body.decode() for body, _, _ in drain(guest, queue)}
    missing = handed_over - bodies
    assert not missing, f"{len(missing)} of {len(handed_over)} handed-over messages lost"


def test_b_new_pools_go_to_the_node_with_the_fewest_connections(cluster, proxy_factory):
    """Six credentials, one after the other: each pool's connection goes to the node with
    the fewest connections of this proxy, two per node; /api/upstreams names the node."""
    p = start_proxy(proxy_factory, cluster.urls)
    wait_for(lambda: set(node_states(p).values()) == {"reachable"}, 15)
    held = []
    try:
        for index in range(6):
            conn = p.connect(tenant(index))
            conn.channel()
            held.append(conn)
        placed = [nodes_of(p, tenant(index).user) for index in range(6)]
        assert all(len(nodes) == 1 for nodes in placed), placed
        spread = {address(n): sum(nodes == [address(n)] for nodes in placed) for n in cluster.nodes}
        assert spread == {address(n): 2 for n in cluster.nodes}, spread
        rows = {row["node"]: row["upstream_connections"] for row in api(p, "/api/nodes")["nodes"]}
        assert rows == spread
        metrics = p.metrics()
        for node in cluster.nodes:
            assert metrics.get("amqproxy_node_upstream_connections", node=address(node)) == 2
            assert metrics.get("amqproxy_node_up", node=address(node)) == 1
    finally:
        for conn in held:
            conn.close()


def test_c_a_node_that_comes_back_takes_new_connections(cluster, proxy_factory):
    """While a node is stopped new pools go to the others; once a probe finds it answering
    again, the next pool goes to it (it has the fewest connections)."""
    p = start_proxy(proxy_factory, cluster.urls)
    victim = cluster.nodes[2]
    held = []
    victim.stop_app()
    try:
        wait_for(lambda: node_states(p)[address(victim)] == "unreachable", 10)
        for index in range(2):
            conn = p.connect(tenant(index))
            conn.channel()
            held.append(conn)
            assert nodes_of(p, tenant(index).user) != [address(victim)]
    finally:
        victim.start_app()
    wait_for(lambda: node_states(p)[address(victim)] == "reachable", 15)
    try:
        conn = p.connect(tenant(6))
        conn.channel()
        held.append(conn)
        assert nodes_of(p, tenant(6).user) == [address(victim)]
    finally:
        for conn in held:
            conn.close()


def test_d_readyz_is_ready_while_any_node_answers(cluster, proxy_factory):
    """Listed: one cluster node and an address where nothing listens. Ready while the node
    answers (one node down); 503 once it stops too (no node answers); ready again once a
    probe finds it back."""
    node = cluster.nodes[1]
    dead = f"amqp://127.0.0.1:{free_port()}"
    p = start_proxy(proxy_factory, [node.url, dead])
    wait_for(lambda: p.http_get("/readyz")[0] == 200, 10)
    body = api(p, "/readyz")
    assert body["ready"] and [row["state"] for row in body["nodes"]] == ["reachable", "unreachable"]
    node.stop_app()
    try:
        wait_for(lambda: p.http_get("/readyz")[0] == 503, 10)
        body = api(p, "/readyz")
        assert body["status"] == "upstream unreachable"
        assert "no node answers" in body["reasons"][0]
        with pytest.raises(pika.exceptions.AMQPError):  # no node: the 320 of today
            p.connect(tenant(0))
    finally:
        node.start_app()
    wait_for(lambda: p.http_get("/readyz")[0] == 200, 15)
    status = run_proxy_cli(["status", "--nodes", "--url", f"http://127.0.0.1:{p.http_port}"])
    assert status.returncode == 0, status.stderr
    assert address(node) in status.stdout and "reachable" in status.stdout


def test_e_the_upstream_list_in_each_place_a_setting_can_be_given(tmp_path):
    """Arguments, commas in AMQP_URL, and lines or commas in the file; --print-config shows
    the list without credentials; one URL stays a string; amqp:// and amqps:// do not mix."""
    from amqproxy.cli import main, settings_from
    from amqproxy.config import ConfigError, load

    urls = ["amqp://n1:5672", "amqp://n2:5672", "amqp://n3"]
    got, _ = settings_from(urls)
    assert got.upstream_nodes == [("n1", 5672, False), ("n2", 5672, False), ("n3", 5672, False)]
    env = load(None, {"AMQP_URL": "amqp://n1, amqp://n2:5673"}, {})
    assert env.upstream_nodes == [("n1", 5672, False), ("n2", 5673, False)]
    config = tmp_path / "amqproxy.ini"
    config.write_text("[main]\nupstream = amqps://n1,\n  amqps://n2:5999\n")
    assert load(str(config), {}, {}).upstream_nodes == [("n1", 5671, True), ("n2", 5999, True)]
    with pytest.raises(ConfigError, match="mixes amqp:// and amqps://"):
        load(None, {"AMQP_URL": "amqp://n1,amqps://n2"}, {})
    with pytest.raises(ConfigError, match="lists n1:5672 twice"):
        load(None, {"AMQP_URL": "amqp://n1,amqp://n1:5672"}, {})
    assert load(None, {"AMQP_URL": "amqp://solo"}, {}).upstream == "amqp://solo"
    printed = run_proxy_cli(["--print-config", "amqp://u:secret@n1", "amqp://n2/vh"])
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout)["upstream"] == ["amqp://n1", "amqp://n2/vh"]
    assert "secret" not in printed.stdout + printed.stderr
    assert main(["--print-config", "amqp://n1,amqps://n2"]) == 2


def test_f_a_reload_of_the_list_drains_the_nodes_no_longer_listed(cluster, tmp_path, proxy_factory):
    """SIGHUP with another list: connections to a node still listed stay; one to a node no
    longer listed keeps its leased channel, takes no new one, and closes once nothing is
    leased on it; the next pools go to the listed nodes."""
    first, second, third = cluster.nodes
    ini = tmp_path / "nodes.ini"

    def write(nodes: list[BrokerNode]) -> None:
        upstream = ",\n  ".join(node.url for node in nodes)
        ini.write_text(f"[main]\nupstream = {upstream}\nbroker_check_interval = 1\n")

    write([first, second])
    p = proxy_factory("-t", "60", "-c", str(ini), upstream=None)
    kept, dropped = p.connect(tenant(0)), p.connect(tenant(1))
    kept_channel, dropped_channel = kept.channel(), dropped.channel()
    assert nodes_of(p, tenant(0).user) == [address(first)]
    assert nodes_of(p, tenant(1).user) == [address(second)]
    write([first, third])
    p.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload: upstream" in p.log(), 10)
    wait_for(lambda: node_states(p).get(address(third)) == "reachable", 10)
    assert {row["node"]: row["listed"] for row in api(p, "/api/nodes")["nodes"]} == {
        address(first): True, address(third): True, address(second): False,
    }  # fmt: skip
    newcomer = p.connect(tenant(2))
    newcomer.channel()
    assert nodes_of(p, tenant(2).user) == [address(third)]  # the new node had no connection
    dropped_channel.basic_publish("", "nowhere", b"still served")  # the old lease still works
    again = dropped.channel()  # the pool's next channel: on a listed node
    assert sorted(nodes_of(p, tenant(1).user)) == sorted([address(second), address(first)])
    dropped_channel.close()
    wait_for(lambda: nodes_of(p, tenant(1).user) == [address(first)], 10)
    assert nodes_of(p, tenant(0).user) == [address(first)]
    kept_channel.basic_publish("", "nowhere", b"untouched")
    again.close()
    for conn in (kept, dropped, newcomer):
        conn.close()
