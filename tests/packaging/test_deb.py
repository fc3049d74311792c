"""The Debian package, end to end on this machine: packaging/build-deb.sh builds it, lintian
passes it, dpkg installs it, the installed proxy carries a publish and a get to the broker, the
unit verifies, and dpkg removes it leaving only the conffile, then purges that.

Needs root and dpkg; packaging/build-deps.sh installs the rest (CI: .ci/run)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from support import BROKER_URL, ROOT, QueueHelper, free_port, wait_for

PACKAGE = "amqproxy"
CONFFILE = "/etc/amqproxy/amqproxy.ini"
UNIT = "/lib/systemd/system/amqproxy.service"
BINARY = "/usr/bin/amqproxy"
# What a service gets from systemd: none of the developer's Python variables.
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("dpkg") is None, reason="needs root on Debian (dpkg)"
    ),
    pytest.mark.timeout(240),
]


def _run(
    *cmd: str, check: bool = True, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env
    )
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} exited {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def _dpkg(*args: str) -> subprocess.CompletedProcess[str]:
    """dpkg, waiting for its lock: the machine is shared with other work that may use apt."""
    deadline = time.monotonic() + 120
    while True:
        res = _run("dpkg", *args, check=False)
        if res.returncode == 0:
            return res
        if "lock" not in res.stderr or time.monotonic() > deadline:
            raise AssertionError(f"dpkg {' '.join(args)} exited {res.returncode}\n{res.stderr}")
        time.sleep(2)


def _status() -> str:
    """dpkg's status of the package: '' when dpkg knows nothing of it."""
    res = _run("dpkg-query", "-W", "-f=${db:Status-Status}", PACKAGE, check=False)
    return res.stdout.strip() if res.returncode == 0 else ""


def _deb_paths(deb: Path) -> list[str]:
    """The absolute paths the .deb holds, from its listing."""
    paths = []
    for line in _run("dpkg-deb", "-c", str(deb)).stdout.splitlines():
        name = line.split(None, 5)[5].split(" -> ")[0]
        path = "/" + name.removeprefix("./").rstrip("/")
        if path != "/":
            paths.append(path)
    return paths


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = _run("bash", str(ROOT / "packaging/build-deps.sh"), "--check").stdout.strip()
    assert not missing, f"the build needs {missing}: run bash packaging/build-deps.sh"
    out = tmp_path_factory.mktemp("deb")
    res = _run("bash", str(ROOT / "packaging/build-deb.sh"), str(out), timeout=300)
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.is_file(), res.stdout + res.stderr
    return path


def _version() -> str:
    text = (ROOT / "src/amqproxy/__init__.py").read_text()
    match = re.search(r'__version__ = "([^"]+)"', text)
    assert match is not None
    return match.group(1)


def test_package_is_lintian_clean_and_complete(deb: Path) -> None:
    arch = _run("dpkg", "--print-architecture").stdout.strip()
    assert deb.name == f"amqproxy_{_version()}_{arch}.deb"
    fields = _run("dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture", "Depends")
    assert f"Version: {_version()}" in fields.stdout
    assert "python3.11" in fields.stdout, fields.stdout
    control = _run("dpkg-deb", "-I", str(deb), "conffiles").stdout.split()
    assert control == [CONFFILE]
    paths = _deb_paths(deb)
    for wanted in (
        BINARY,
        UNIT,
        CONFFILE,
        "/opt/amqproxy/bin/amqproxy",
        "/opt/amqproxy/pyvenv.cfg",
    ):
        assert wanted in paths, f"{wanted} is not in the package"
    site = "/opt/amqproxy/lib/python3.11/site-packages"
    assert any(re.fullmatch(rf"{site}/amqproxy/amqp/_scan\.cpython-311-.*\.so", p) for p in paths)
    for dependency in ("pamqp", "prometheus_client", "uvloop"):
        assert f"{site}/{dependency}/__init__.py" in paths, f"{dependency} is not bundled"
    # No bytecode in the package (postinst makes it), no installer in the environment.
    assert not [p for p in paths if "__pycache__" in p or p.endswith(".pyc")]
    assert not [p for p in paths if re.search(rf"{site}/(pip|setuptools)/", p)]
    # Errors and warnings fail; the ones the package overrides are explained in
    # packaging/deb/lintian-overrides.
    lint = _run("lintian", "--fail-on", "error,warning", str(deb), check=False, timeout=180)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_conffile_comments_show_the_defaults(tmp_path: Path) -> None:
    """Every commented-out key of the shipped conffile, uncommented, gives the default it shows:
    the comments cannot drift from the proxy."""
    shipped = (ROOT / "packaging/amqproxy.ini").read_text()
    uncommented = re.sub(r"(?m)^# ([a-z_]+ =.*)$", r"\1", shipped)
    keys = re.findall(r"(?m)^# ([a-z_]+) =", shipped)
    assert len(keys) >= 18, keys
    parser = configparser.ConfigParser()
    parser.read_string(uncommented)  # the file parses, with every key in it
    configs = []
    for text in (shipped, uncommented):
        path = tmp_path / f"{uuid.uuid4().hex[:6]}.ini"
        path.write_text(text)
        res = subprocess.run(
            [sys.executable, "-m", "amqproxy", "-c", str(path), "--print-config"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**CLEAN_ENV, "PYTHONPATH": str(ROOT / "src")},
        )
        assert res.returncode == 0, res.stderr
        configs.append(json.loads(res.stdout))
    assert configs[0] == configs[1]
    assert configs[0]["upstream"] == "amqp://localhost:5672"


def _http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _run_installed_proxy(workdir: Path, queue: str) -> None:
    """Start /usr/bin/amqproxy as an unprivileged user with a config file, publish and get a
    message through it, check /healthz and the compiled scanner, and stop it with SIGTERM."""
    port, http_port = free_port(), free_port()
    config = workdir / "amqproxy.ini"
    config.write_text(
        f"[main]\nupstream = {BROKER_URL}\nlog_level = info\n\n"
        f"[listen]\naddress = 127.0.0.1\nport = {port}\nhttp_port = {http_port}\n"
    )
    config.chmod(0o644)
    log_path = workdir / "proxy.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [BINARY, "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=CLEAN_ENV,
            cwd="/",
            user="nobody",
            group="nogroup",
            extra_groups=[],
        )
    try:

        def ready() -> bool:
            assert proc.poll() is None, f"exited {proc.returncode}\n{log_path.read_text()}"
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
            return _http_status(http_port, "/healthz") == 200

        wait_for(ready, 20, message=lambda: log_path.read_text())
        body = f"through the deb {uuid.uuid4().hex}".encode()
        params = pika.ConnectionParameters(
            "127.0.0.1", port, "/", pika.PlainCredentials("guest", "guest")
        )
        with pika.BlockingConnection(params) as conn:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish("", queue, body, mandatory=True)
        with pika.BlockingConnection(params) as conn:
            ch = conn.channel()
            got = wait_for(lambda: ch.basic_get(queue, auto_ack=True)[2], 10)
        assert got == body
        # The compiled scanner of the package ran, loaded from the package's environment.
        log = log_path.read_text()
        assert "frame scanner: compiled" in log, log
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "/opt/amqproxy/lib/python3.11/site-packages/amqproxy/amqp/_scan" in maps
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
        assert "Traceback" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory the unprivileged proxy can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="amqproxy-deb-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_install_run_remove_purge(deb: Path, workdir: Path, queues: QueueHelper) -> None:
    assert _status() == "", (
        "amqproxy is already known to dpkg on this machine (a previous run?): "
        "dpkg --purge amqproxy, then run again"
    )
    for own in ("/opt/amqproxy", "/etc/amqproxy"):
        assert not os.path.lexists(own), f"{own} is there before the install: remove it first"
    paths = _deb_paths(deb)
    existed = {p for p in paths if os.path.lexists(p)}
    # Only shared directories may be there before: the package replaces nobody's file.
    assert all(os.path.isdir(p) for p in existed), existed
    queue = queues.declare()
    try:
        _dpkg("-i", str(deb))
        assert _status() == "installed"
        listed = set(_run("dpkg", "-L", PACKAGE).stdout.split()) - {"/."}
        assert listed == set(paths)
        assert _run(BINARY, "--version", env=CLEAN_ENV).stdout.strip() == f"amqproxy {_version()}"
        # postinst compiled the environment's modules.
        assert list(Path("/opt/amqproxy/lib").rglob("__pycache__/cli.cpython-311.pyc"))
        # The shipped conffile is valid as it is.
        printed = json.loads(_run(BINARY, "-c", CONFFILE, "--print-config", env=CLEAN_ENV).stdout)
        assert printed["listen_address"] == "localhost"
        # The unit: systemd-analyze prints nothing when it has nothing to say.
        verify = _run("systemd-analyze", "verify", UNIT, check=False)
        assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), (
            verify.stdout + verify.stderr
        )

        _run_installed_proxy(workdir, queue)

        _dpkg("-r", PACKAGE)
        assert _status() == "config-files"
        left = sorted(
            p
            for p in listed
            if os.path.lexists(p) and p not in existed and p not in (CONFFILE, "/etc/amqproxy")
        )
        assert left == [], f"dpkg -r left {left}"
        assert os.path.isfile(CONFFILE)
        assert not os.path.exists("/opt/amqproxy"), list(Path("/opt/amqproxy").rglob("*"))

        _dpkg("--purge", PACKAGE)
        assert _status() == ""
        assert not os.path.lexists("/etc/amqproxy")
        state = list(Path("/var/lib/systemd").glob("deb-systemd-helper-*/**/amqproxy*"))
        assert state == [], state
    finally:
        if _status():
            _dpkg("--purge", PACKAGE)
        # What a failed removal left: none of it was there before the test.
        shutil.rmtree("/opt/amqproxy", ignore_errors=True)
        shutil.rmtree("/etc/amqproxy", ignore_errors=True)
