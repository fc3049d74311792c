"""Every suite's fixtures and hooks come from the ``support`` package (tests/support)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.fixtures import (  # noqa: E402
    fault_relay,
    module_proxy_factory,
    proxy,
    proxy_factory,
    pytest_runtest_makereport,
    pytest_runtest_protocol,
    pytest_sessionfinish,
    queues,
    tenant,
    tenant_factory,
)

__all__ = [
    "fault_relay",
    "module_proxy_factory",
    "proxy",
    "proxy_factory",
    "pytest_runtest_makereport",
    "pytest_runtest_protocol",
    "pytest_sessionfinish",
    "queues",
    "tenant",
    "tenant_factory",
]
