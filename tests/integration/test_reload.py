"""SIGHUP reloads the config file while clients stay connected: the log level, timeouts, limits
and the upstream URL change (each change logged); a file that does not load changes nothing and
logs one ERROR naming the key; the listen address and ports need a restart (WARNING)."""

from __future__ import annotations

import signal
import socket
import uuid
from pathlib import Path

import pika
import pytest
from support import BROKER_URL, UPSTREAM_CONNECTIONS, Proxy, drain, free_port, wait_for


class Configured:
    """A proxy started with ``-c FILE`` only (the listen address and ports in the file too,
    so that the file can change every setting), and the file it rereads on SIGHUP."""

    def __init__(self, factory, tmp_path: Path, **main: object) -> None:
        self.ini = tmp_path / f"amqproxy-{uuid.uuid4().hex[:6]}.ini"
        self.proxy = Proxy(["-c", str(self.ini)], None, self.ini.with_suffix(".log"), None, False)
        self.proxy.port, self.proxy.http_port = free_port(), free_port()
        self.listen = {"address": "127.0.0.1", "port": self.proxy.port}
        self.listen["http_port"] = self.proxy.http_port
        self.write(**main)
        factory.started.append(self.proxy)  # stopped, and its log checked, by the fixture
        self.proxy.start()
        self._seen = 0

    def write(self, **main: object) -> None:
        values = {"upstream": BROKER_URL, "log_level": "info", **main}
        lines = ["[main]", *(f"{k} = {v}" for k, v in values.items()), "", "[listen]"]
        lines += [f"{k} = {v}" for k, v in self.listen.items()]
        self.ini.write_text("\n".join(lines) + "\n")

    def reload(self, until: str) -> list[str]:
        """SIGHUP, and the log lines of this reload once one contains ``until``."""
        start = len(self.proxy.log().splitlines())
        self.proxy.send_signal(signal.SIGHUP)

        def lines() -> list[str] | None:
            new = self.proxy.log().splitlines()[start:]
            return new if any(until in line for line in new) else None

        return wait_for(lines, 10, message=lambda: f"no log line with {until!r} after SIGHUP")


def _publish(channel, queue: str, body: bytes) -> None:
    channel.basic_publish("", queue, body)  # the channel is in confirm mode: acked here


@pytest.mark.timeout(60)
def test_reload_applies_log_level_timeouts_and_limits_while_a_client_stays(
    proxy_factory, tmp_path, tenant_factory, queues
):
    cfg = Configured(proxy_factory, tmp_path, idle_connection_timeout=60)
    proxy = cfg.proxy
    stayer, passer = tenant_factory(), tenant_factory()
    q = queues.declare(stayer)
    conn = proxy.connect(stayer)
    ch = conn.channel()
    ch.confirm_delivery()
    _publish(ch, q, b"before")
    gone = proxy.connect(passer)  # leaves an idle upstream behind, kept for 60 s
    gone.channel()
    gone.close()

    cfg.write(log_level="debug", idle_connection_timeout=1, max_clients=1)
    lines = cfg.reload(until="reload: max_clients 0 -> 1")
    changed = [line.split("amqproxy.server: ", 1)[1] for line in lines if "reload:" in line]
    assert changed == [
        "reload: log_level info -> debug",
        "reload: idle_connection_timeout 60 -> 1",
        "reload: max_clients 0 -> 1",
    ]
    assert all(" INFO " in line for line in lines if "reload:" in line)

    # The new idle timeout: the other tenant's idle upstream closes now, not in a minute.
    wait_for(
        lambda: f"closing idle upstream amqproxy {passer.user}@{passer.vhost}" in proxy.log(),
        10,
        message="the idle upstream was not closed after the timeout went down to 1 s",
    )
    # The new limit: the connected client is the one allowed.
    with pytest.raises(pika.exceptions.AMQPConnectionError) as err:
        proxy.connect(stayer)
    assert "too many client connections (max-clients 1)" in str(err.value)
    # The new level: the refusal is logged at DEBUG.
    wait_for(lambda: " DEBUG amqproxy.client: closing client" in proxy.log(), 5)

    # The client connected all along did not notice.
    _publish(ch, q, b"after")
    second = conn.channel()
    second.confirm_delivery()
    _publish(second, q, b"new channel")
    conn.close()
    assert [body for body, _, _ in drain(stayer, q)] == [b"before", b"after", b"new channel"]


@pytest.mark.timeout(60)
def test_a_config_that_does_not_load_changes_nothing_and_names_the_key(
    proxy_factory, tmp_path, tenant, queues
):
    cfg = Configured(proxy_factory, tmp_path, max_clients=2)
    proxy = cfg.proxy
    q = queues.declare(tenant)
    conn = proxy.connect(tenant)
    ch = conn.channel()
    ch.confirm_delivery()

    cfg.write(max_clients=1, idle_connection_timeout="soon")
    lines = cfg.reload(until="reload failed")
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1, lines
    assert "[main] idle_connection_timeout" in errors[0] and "'soon'" in errors[0]
    assert not [line for line in lines if "reload: max_clients" in line]
    other = proxy.connect(tenant)  # max_clients is still 2
    other.close()

    cfg.write(max_clients=1)
    cfg.ini.write_text(cfg.ini.read_text() + "bogus = 1\n")  # in [listen]: an unknown key
    lines = cfg.reload(until="reload failed")
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1 and "[listen] bogus: unknown setting" in errors[0], lines

    missing = cfg.ini.with_suffix(".no-such-ca.pem")
    cfg.write(max_clients=1, upstream="amqps://127.0.0.1:5671", upstream_ca=missing)
    lines = cfg.reload(until="reload failed")
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1 and "upstream_ca" in errors[0] and str(missing) in errors[0], lines

    cfg.ini.unlink()
    lines = cfg.reload(until="reload failed")
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1 and f"cannot read {cfg.ini}" in errors[0], lines

    cfg.write(max_clients=1)  # a good file again: it applies
    cfg.reload(until="reload: max_clients 2 -> 1")
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        proxy.connect(tenant)
    _publish(ch, q, b"still connected")
    conn.close()
    assert [body for body, _, _ in drain(tenant, q)] == [b"still connected"]
    assert "Traceback" not in proxy.log()


@pytest.mark.timeout(60)
def test_listen_settings_need_a_restart(proxy_factory, tmp_path, tenant):
    cfg = Configured(proxy_factory, tmp_path)
    proxy = cfg.proxy
    old_port, new_port = proxy.port, free_port()
    cfg.listen["port"] = new_port
    cfg.write(heartbeat=30)
    lines = cfg.reload(until="reload: heartbeat 60 -> 30")
    warnings = [line for line in lines if " WARNING " in line]
    assert len(warnings) == 1, lines
    assert (
        f"reload: listen_port {old_port} -> {new_port} needs a restart; not applied"
        in (warnings[0])
    )
    with socket.socket() as probe:  # nothing listens on the new port
        assert probe.connect_ex(("127.0.0.1", new_port)) != 0
    conn = proxy.connect(tenant)  # the old one serves, with the new heartbeat offered
    assert conn._impl.params.heartbeat == 30
    conn.close()


@pytest.mark.timeout(60)
def test_a_new_upstream_url_serves_new_clients_while_old_ones_keep_theirs(
    proxy_factory, tmp_path, tenant, queues, fault_relay
):
    cfg = Configured(proxy_factory, tmp_path)
    proxy = cfg.proxy
    q = queues.declare(tenant)
    old_client = proxy.connect(tenant)
    old_channel = old_client.channel()
    old_channel.confirm_delivery()
    _publish(old_channel, q, b"old 1")

    cfg.write(upstream=f"amqp://user:secret@127.0.0.1:{fault_relay.port}/ignored")
    lines = cfg.reload(until="reload: upstream")
    assert any(
        f"reload: upstream amqp://127.0.0.1:5672 -> amqp://127.0.0.1:{fault_relay.port}" in line
        for line in lines
    ), lines
    assert "secret" not in proxy.log()

    # A new client of the same pool reaches the new upstream...
    new_client = proxy.connect(tenant)
    new_channel = new_client.channel()
    new_channel.confirm_delivery()
    _publish(new_channel, q, b"new 1")
    assert fault_relay.accepted_total == 1
    # ... while the client connected before keeps its channel on the old one,
    _publish(old_channel, q, b"old 2")
    # and its next channel is opened on the new one (the connection there is shared).
    old_next = old_client.channel()
    old_next.confirm_delivery()
    _publish(old_next, q, b"old 3")
    assert fault_relay.accepted_total == 1
    assert proxy.metric(UPSTREAM_CONNECTIONS, **tenant.labels) == 2

    # Once nothing is leased on the old connection, it closes: the pool has drained.
    old_channel.close()
    wait_for(lambda: "the upstream address was replaced" in proxy.log(), 10)
    proxy.wait_metric(UPSTREAM_CONNECTIONS, 1, **tenant.labels)
    _publish(old_next, q, b"old 4")
    for conn in (old_client, new_client):
        conn.close()
    assert sorted(body for body, _, _ in drain(tenant, q)) == [
        b"new 1", b"old 1", b"old 2", b"old 3", b"old 4",
    ]  # fmt: skip
