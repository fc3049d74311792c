"""The real-client suite's own fixtures: are the non-Python clients installed? (The proxy
factory, tenants and queues come from tests/conftest.py, as for every suite.)"""

from __future__ import annotations

import pytest
from clientlib import node_available, php_available, tool_available

INSTALL_HINT = "run tests/install.sh (CI does)"


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
    missing = [
        t
        for t in ("amqp-publish", "amqp-get", "amqp-consume", "amqp-declare-queue")
        if not tool_available(t)
    ]
    if missing:
        pytest.fail(f"{missing} missing (Debian amqp-tools): {INSTALL_HINT}")
