"""The pytest fixtures and hooks of every suite (imported by tests/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.broker import _PENDING_DELETES, _TENANTS, QueueHelper, Tenant, _ctl_async, rabbitmqctl
from support.node import BrokerNode
from support.proxy import _PROXIES, Proxy, _ProxyFactory
from support.relay import FaultRelay


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[_ProxyFactory]:
    """Function-scoped: ``proxy_factory("-t", "1", upstream=...)`` -> running Proxy."""
    factory = _ProxyFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def module_proxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_ProxyFactory]:
    """Module-scoped variant for proxies shared by the tests of one module."""
    factory = _ProxyFactory(tmp_path_factory.mktemp("proxy"))
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def proxy(module_proxy_factory: _ProxyFactory) -> Proxy:
    """One default proxy per module, straight to the broker, idle timeout long enough that
    pools do not disappear under a test."""
    return module_proxy_factory("-t", "60")


# attach proxy logs to failing tests ----------------------------------------------------------
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    item._amqproxy_t0 = time.monotonic()  # type: ignore[attr-defined]
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    t0 = getattr(item, "_amqproxy_t0", 0.0)
    for p in _PROXIES:
        if p.started_at and (p.stopped_at is None or p.stopped_at >= t0):
            report.sections.append((f"amqproxy log ({report.when})", p.log_tail(200)))


@pytest.fixture
def tenant_factory() -> Iterator[Callable[..., Tenant]]:
    """Throwaway tenants, deleted (in the background) after the test.

    ``tenant_factory()``: a fresh vhost for the session user (own pool, own metric labels).
    ``tenant_factory(own_user=True)``: a fresh vhost and a new user with rights only there.
    ``tenant_factory(vhost=v)``: a new user with rights on the existing vhost ``v``.
    ``password=``: the new user's password (a random one by default).
    """
    created_users: list[str] = []
    created_vhosts: list[str] = []

    def make(vhost: str | None = None, own_user: bool = False, password: str = "") -> Tenant:
        if vhost is None:
            base = _TENANTS.take()
            created_vhosts.append(base.vhost)
            if not own_user:
                return base
            vhost = base.vhost
        user = f"itest-own-{uuid.uuid4().hex[:8]}"
        password = password or f"pw-{uuid.uuid4().hex[:12]}"
        rabbitmqctl("add_user", user, password)
        created_users.append(user)
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        return Tenant(user, password, vhost)

    yield make
    for u in created_users:
        _PENDING_DELETES.append(_ctl_async("delete_user", u))
    for v in created_vhosts:
        _PENDING_DELETES.append(_ctl_async("delete_vhost", v))
    # keep at most a few deletions in flight so they do not starve the tests of CPU
    while sum(p.poll() is None for p in _PENDING_DELETES) > 2:
        time.sleep(0.05)


@pytest.fixture
def tenant(tenant_factory: Callable[..., Tenant]) -> Tenant:
    return tenant_factory()


@pytest.fixture(scope="session")
def private_node() -> Iterator[BrokerNode]:
    """A RabbitMQ node of this test run's own, for tests that change what other runs of the
    shared broker would see (users' passwords, memory alarms); started on first use."""
    node = BrokerNode(f"amqproxy-tests-{os.getpid()}@localhost").start()
    yield node
    node.stop()


@pytest.fixture
def node_user(private_node: BrokerNode) -> Callable[..., Tenant]:
    """``node_user(password=None)``: a new user on the private node, with rights on "/"."""

    def make(password: str | None = None) -> Tenant:
        user = f"itest-node-{uuid.uuid4().hex[:8]}"
        password = password or f"pw-{uuid.uuid4().hex[:12]}"
        for args in (("add_user", user, password),
                     ("set_permissions", "-p", "/", user, ".*", ".*", ".*")):  # fmt: skip
            done = private_node.ctl(*args)
            assert done.returncode == 0, done.stderr
        return Tenant(user, password, "/", private_node.plain_port)

    return make


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for p in _PROXIES:
        if p.alive:
            with contextlib.suppress(Exception):
                p.stop(timeout=5)
    for p in _PENDING_DELETES:
        with contextlib.suppress(Exception):
            p.communicate(timeout=60)
    for p in _TENANTS.finish():
        with contextlib.suppress(Exception):
            p.communicate(timeout=60)


@pytest.fixture
def queues() -> Iterator[QueueHelper]:
    helper = QueueHelper()
    yield helper
    helper.cleanup()


@pytest.fixture
def fault_relay() -> Iterator[FaultRelay]:
    relay = FaultRelay().start()
    yield relay
    relay.close()
