"""rabbitmq-c command-line tools (Debian amqp-tools: amqp-declare-queue, amqp-publish, amqp-get,
amqp-consume) through the proxy. Each tool is one process and one connection, like a cron job.
The tools expose only content_type, content_encoding, reply_to, persistent delivery and string
headers (no confirms, tx, qos beyond prefetch, nack or channel choice): those are covered by the
library clients."""

from __future__ import annotations

import subprocess

import pytest
from clientlib import (
    BODY_SIZES,
    UPSTREAM_CONNECTIONS,
    UPSTREAM_CONNECTS,
    body_of,
    drain,
    queue_counts,
    raw_get,
    wait_for,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("need_amqp_tools")]


def tool(proxy, tenant, name: str, *args: str, stdin: bytes = b"", timeout: float = 20.0) -> bytes:
    argv = [
        name,
        f"--server={proxy.host}",
        f"--port={proxy.port}",
        f"--vhost={tenant.vhost}",
        f"--username={tenant.user}",
        f"--password={tenant.password}",
        *args,
    ]
    res = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
    assert res.returncode == 0, f"{name} {args} exited {res.returncode}: {res.stderr[-2000:]!r}"
    return res.stdout


@pytest.mark.timeout(120)
def test_amqp_publish_per_process_20_times_then_get_and_consume(proxy, tenant, queues):
    q = queues.name("tools-q")
    before = proxy.metric(UPSTREAM_CONNECTS, **tenant.labels)
    assert tool(proxy, tenant, "amqp-declare-queue", "-q", q).strip() == q.encode()
    queues.created.append((tenant, q))
    for i in range(20):
        tool(
            proxy,
            tenant,
            "amqp-publish",
            "-r",
            q,
            "-p",
            "-C",
            "text/plain",
            "-E",
            "utf-8",
            "-t",
            "reply-here",
            "-H",
            f"n: {i}",
            "-H",
            "kind: tool",
            "-b",
            f"tool-{i}",
        )
    wait_for(lambda: queue_counts(tenant, q)[0] == 20, 5)
    # one upstream connection for 21 short-lived client processes
    assert proxy.metric(UPSTREAM_CONNECTS, **tenant.labels) - before == 1
    assert proxy.metric(UPSTREAM_CONNECTIONS, **tenant.labels) == 1

    first = raw_get(tenant, q)  # straight from the broker: what amqp-publish sent
    assert first is not None and first.body == b"tool-0"
    assert first.properties == {
        "content_type": "text/plain",
        "content_encoding": "utf-8",
        "headers": {"n": ("S", "0"), "kind": ("S", "tool")},
        "delivery_mode": 2,
        "reply_to": "reply-here",
    }
    for i in range(1, 10):
        assert tool(proxy, tenant, "amqp-get", "-q", q) == f"tool-{i}".encode()
    out = tool(
        proxy, tenant, "amqp-consume", "-q", q, "-c", "10", "-p", "2", "--", "sh", "-c", "cat; echo"
    )
    assert out.decode().split() == [f"tool-{i}" for i in range(10, 20)]
    assert queue_counts(tenant, q) == (0, 0)
    # amqp-get on an empty queue fails cleanly (exit 2, no hang)
    res = subprocess.run(
        [
            "amqp-get",
            f"--server={proxy.host}",
            f"--port={proxy.port}",
            f"--vhost={tenant.vhost}",
            f"--username={tenant.user}",
            f"--password={tenant.password}",
            "-q",
            q,
        ],
        capture_output=True,
        timeout=20,
    )
    assert res.returncode != 0 and res.stdout == b""


@pytest.mark.timeout(120)
def test_amqp_tools_bodies_from_empty_to_10_mib(proxy, tenant, queues):
    q = queues.declare(tenant)
    for i, size in enumerate(BODY_SIZES):  # body from standard input
        tool(proxy, tenant, "amqp-publish", "-r", q, stdin=body_of(size, i), timeout=60)
    wait_for(lambda: queue_counts(tenant, q)[0] == len(BODY_SIZES), 10)
    for i, size in enumerate(BODY_SIZES[:3]):
        got = tool(proxy, tenant, "amqp-get", "-q", q, timeout=60)
        assert got == body_of(size, i), f"{size} B body altered"
    out = tool(
        proxy,
        tenant,
        "amqp-consume",
        "-q",
        q,
        "-c",
        "3",
        "-p",
        "1",
        "--",
        "sh",
        "-c",
        "wc -c",
        timeout=60,
    )
    assert [int(x) for x in out.split()] == BODY_SIZES[3:]
    # bytes checked too: the three large bodies published again, read back one by one
    for i, size in enumerate(BODY_SIZES[3:], start=3):
        tool(proxy, tenant, "amqp-publish", "-r", q, stdin=body_of(size, i), timeout=60)
        assert tool(proxy, tenant, "amqp-get", "-q", q, timeout=60) == body_of(size, i)
    assert drain(tenant, q) == []
