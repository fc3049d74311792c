"""Every suite's fixtures and hooks come from the ``support`` package (tests/support); before
anything runs, the shared broker on 127.0.0.1:5672 is started if nothing answers there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.fixtures import (
    fault_relay,
    module_proxy_factory,
    node_user,
    private_node,
    proxy,
    proxy_factory,
    pytest_runtest_makereport,
    pytest_runtest_protocol,
    pytest_sessionfinish,
    queues,
    tenant,
    tenant_factory,
)


def pytest_sessionstart(session: pytest.Session) -> None:
    from support.sharedbroker import ensure_running

    problem = ensure_running()
    if problem is not None:
        raise pytest.UsageError(f"the tests need RabbitMQ on 127.0.0.1:5672: {problem}")


__all__ = [
    "fault_relay",
    "module_proxy_factory",
    "node_user",
    "private_node",
    "proxy",
    "proxy_factory",
    "pytest_runtest_makereport",
    "pytest_runtest_protocol",
    "pytest_sessionfinish",
    "pytest_sessionstart",
    "queues",
    "tenant",
    "tenant_factory",
]
