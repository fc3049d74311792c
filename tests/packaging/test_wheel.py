"""`python -m build` makes a wheel and an sdist, and `pipx install` of them gives an `amqproxy`
command that serves clients: what a user installing from a release or a clone gets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import uuid
import zipfile
from pathlib import Path

import pika
import pytest
from support import BROKER_URL, ROOT, QueueHelper, free_port, wait_for

pytestmark = pytest.mark.timeout(300)


def run(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=240, env=env
    )
    assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_build_makes_a_wheel_and_an_sdist_and_pipx_installs_a_working_command(tmp_path):
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT)
    (wheel,) = dist.glob("amqproxy-*.whl")
    (sdist,) = dist.glob("amqproxy-*.tar.gz")
    with tarfile.open(sdist) as tar:  # the sdist builds the C scanner where it is installed
        names = tar.getnames()
    for wanted in ("src/amqproxy/amqp/_scan.c", "setup.py", "README.md", "pyproject.toml"):
        assert any(n.endswith(wanted) for n in names), wanted
    with zipfile.ZipFile(wheel) as whl:
        assert "amqproxy/core/client.py" in whl.namelist()

    env = {**os.environ, "PIPX_HOME": str(tmp_path / "pipx"), "PIPX_BIN_DIR": str(tmp_path / "bin")}
    env.pop("PYTHONPATH", None)
    run(sys.executable, "-m", "pipx", "install", "--python", sys.executable, sdist, env=env)
    command = tmp_path / "bin" / "amqproxy"
    assert "amqproxy 0.1.0" in run(command, "--version", env=env)
    serve_one_message(command, env, tmp_path)


def serve_one_message(command: Path, env: dict[str, str], tmp_path: Path) -> None:
    """Start the installed command, publish and get one message through it, stop it."""
    port, http_port = free_port(), free_port()
    queues = QueueHelper()
    queue = queues.declare()
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        argv = [str(command), "-l", "127.0.0.1", "-p", str(port), "-b", str(http_port), BROKER_URL]
        proc = subprocess.Popen(argv, stdout=out, stderr=out, env=env, cwd=tmp_path)
    try:
        params = pika.ConnectionParameters("127.0.0.1", port, connection_attempts=20,
                                           retry_delay=0.25)  # fmt: skip
        body = f"installed with pipx {uuid.uuid4().hex}".encode()
        with pika.BlockingConnection(params) as conn:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish("", queue, body)
        with pika.BlockingConnection(params) as conn:
            got = wait_for(lambda: conn.channel().basic_get(queue, auto_ack=True)[2], 10)
        assert got == body
        assert "frame scanner: compiled" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        queues.cleanup()
