"""A private RabbitMQ node with a TLS listener, for the TLS-upstream cases of S1.

The shared broker (rabbit@localhost) has no TLS listener and must not be reconfigured, so the
bench starts its own node (tests/support/node.py: own name, directories, cookie and ports).

    python bench/tlsbroker.py            # start, print ports and CA path, wait for Ctrl-C, stop
"""

from __future__ import annotations

import os
import signal
import sys
import time

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

from support.node import BrokerNode

NODENAME = "bench-tls@localhost"


def TLSBroker() -> BrokerNode:
    """The bench's TLS node on fixed ports (plain 5682, TLS 5681, distribution 25682)."""
    return BrokerNode(NODENAME, plain_port=5682, tls_port=5681, dist_port=25682)


def main() -> int:
    broker = TLSBroker()
    t0 = time.monotonic()
    broker.start()
    print(
        f"{broker.nodename} ready in {time.monotonic() - t0:.1f}s: plain {broker.plain_port}, "
        f"tls {broker.tls_port}, CA {broker.ca}",
        flush=True,
    )
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
