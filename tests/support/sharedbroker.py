"""The shared broker on 127.0.0.1:5672 that most tests use: started (installed first, on
Debian) when nothing answers there, so that the test command works on a fresh machine."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

PORT = 5672


def answers(timeout: float = 2.0) -> bool:
    """Something speaks AMQP on 127.0.0.1:5672 (it answers a protocol header)."""
    try:
        with socket.create_connection(("127.0.0.1", PORT), timeout=timeout) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            sock.settimeout(timeout)
            return sock.recv(1) == b"\x01"  # Connection.Start
    except OSError:
        return False


def ensure_running(wait: float = 120.0) -> str | None:
    """Start RabbitMQ if it does not answer; None when it does, else why it cannot."""
    if answers():
        return None
    server = shutil.which("rabbitmq-server") or "/usr/sbin/rabbitmq-server"
    if not os.path.exists(server):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            return "no broker on 127.0.0.1:5672 and rabbitmq-server is not installed"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "rabbitmq-server"], env=env, check=False)
    subprocess.run([server, "-detached"], check=False, capture_output=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if answers():
            ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
            subprocess.run([ctl, "await_startup", "--timeout", "60"], capture_output=True)
            return None
        time.sleep(1)
    return f"rabbitmq-server did not answer on 127.0.0.1:{PORT} within {wait:.0f}s"
