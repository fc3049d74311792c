"""Fixtures for the real-client suite: the integration suite's fixtures and hooks (proxy factory,
throwaway tenants, queues, proxy logs attached to failures, cleanup at session end), imported from
tests/integration/conftest.py through clientlib (loaded there as ``itest_conftest``)."""

from __future__ import annotations

import pytest
from clientlib import itest, node_available, php_available, tool_available

# fixtures
proxy_factory = itest.proxy_factory
module_proxy_factory = itest.module_proxy_factory
proxy = itest.proxy
tenant_factory = itest.tenant_factory
tenant = itest.tenant
queues = itest.queues

# hooks: proxy logs on failing tests, tenants deleted at the end of the session
pytest_runtest_protocol = itest.pytest_runtest_protocol
pytest_runtest_makereport = itest.pytest_runtest_makereport
pytest_sessionfinish = itest.pytest_sessionfinish

INSTALL_HINT = "run tests/clients/install.sh (CI does)"


@pytest.fixture(scope="session")
def need_node() -> None:
    if not node_available():
        pytest.fail(f"node or tests/clients/node/node_modules/amqplib missing: {INSTALL_HINT}")


@pytest.fixture(scope="session")
def need_php() -> None:
    if not php_available():
        pytest.fail(f"php-cli or php-amqplib missing: {INSTALL_HINT}")


@pytest.fixture(scope="session")
def need_amqp_tools() -> None:
    missing = [t for t in ("amqp-publish", "amqp-get", "amqp-consume", "amqp-declare-queue")
               if not tool_available(t)]
    if missing:
        pytest.fail(f"{missing} missing (Debian amqp-tools): {INSTALL_HINT}")
