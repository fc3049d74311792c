"""Build the Dockerfile's stages in root file systems with chroot, then run the image's
entry point and health check there and use the proxy: the container image checked on a machine
with no container engine. packaging/check-image.sh makes the base (debootstrap) and calls this
inside a private mount namespace, so no mount outlives it.

    python3 packaging/image_check.py --base ROOTFS --work DIR [--dockerfile Dockerfile]

It interprets the instructions this project's Dockerfile uses (FROM, RUN, WORKDIR, COPY with
--from, ENV, USER, EXPOSE, HEALTHCHECK, STOPSIGNAL, ENTRYPOINT, CMD) as docker build does, with
.dockerignore, and stops at any other. The check needs pika and the broker on 127.0.0.1:5672.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "debian:bookworm-slim"
DOCKER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BROKER = ("127.0.0.1", 5672)


def say(text: str) -> None:
    print(f"image-check: {text}", flush=True)


@dataclass
class Stage:
    name: str
    root: Path
    env: dict[str, str] = field(default_factory=lambda: {"PATH": DOCKER_PATH})
    workdir: str = "/"
    user: str = "root"
    expose: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    healthcheck_options: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    stopsignal: str = "SIGTERM"


# -- the Dockerfile ------------------------------------------------------------------------------
def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, rest = whole.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    if pending:
        raise SystemExit("Dockerfile ends inside a continued line")
    return result


def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (exclude?, pattern) in order; the last rule that matches decides."""
    path = REPO / ".dockerignore"
    rules = []
    for line in path.read_text().splitlines() if path.exists() else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                if pattern.startswith("/", i):
                    regex = regex[:-2] + "(?:.*/)?"
                    i += 1
                continue
            char = pattern[i]
            regex += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
            i += 1
        rules.append((not negate, re.compile(regex + r"\Z")))
    return rules


def ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """A path is excluded when the last rule matching it or one of its parents excludes."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for exclude, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            verdict = exclude
    return verdict


def ids(stage: Stage, user: str) -> tuple[int, int]:
    """uid and gid of USER (name or number, optionally :group) in the stage's own files."""
    name, _, group = user.partition(":")

    def look(file: str, key: str) -> int:
        if key.isdigit():
            return int(key)
        for line in (stage.root / file).read_text().splitlines():
            fields = line.split(":")
            if fields[0] == key:
                return int(fields[2])
        raise SystemExit(f"{key} is not in the image's /{file}")

    uid = look("etc/passwd", name)
    if group:
        return uid, look("etc/group", group)
    if name.isdigit():
        return uid, 0 if uid == 0 else uid
    for line in (stage.root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return uid, int(fields[3])
    return uid, uid


def in_root(stage: Stage, user: str | None = None, workdir: str | None = None):
    """preexec_fn: enter the stage's root as a container process would."""
    uid, gid = ids(stage, user or stage.user)
    cwd = workdir or stage.workdir

    def enter() -> None:
        os.chroot(stage.root)
        os.chdir(cwd)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return enter


def container_env(stage: Stage, extra: dict[str, str] | None = None) -> dict[str, str]:
    uid, _ = ids(stage, stage.user)
    home = "/"
    for line in (stage.root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[2] == str(uid):
            home = fields[5]
            break
    env = {"HOSTNAME": "image-check", "HOME": home}
    env.update(stage.env)
    env.update(extra or {})
    return env


def copy_into(stage: Stage, sources: list[Path], base: Path, dest: str, context: bool) -> None:
    rules = ignore_rules() if context else []
    target = stage.root / (dest if dest.startswith("/") else f"{stage.workdir}/{dest}").lstrip("/")
    as_dir = dest.endswith("/") or len(sources) > 1 or any(s.is_dir() for s in sources)
    written: list[Path] = []
    for source in sources:
        if source.is_dir():  # its contents, not the directory itself, as docker does
            for path in sorted(source.rglob("*")):
                if context and ignored(path.relative_to(base).as_posix(), rules):
                    continue
                out = target / path.relative_to(source)
                if path.is_dir() and not path.is_symlink():
                    out.mkdir(parents=True, exist_ok=True)
                else:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, out, follow_symlinks=False)
                written.append(out)
        else:
            if context and ignored(source.relative_to(base).as_posix(), rules):
                raise SystemExit(f"COPY {source.name}: excluded by .dockerignore")
            out = target / source.name if as_dir else target
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, out)
            written.append(out)
    for path in written:
        os.lchown(path, 0, 0)  # COPY without --chown: files belong to root


def mount_runtime(root: Path) -> None:
    """What the engine gives a container: /proc, and the host's DNS configuration."""
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    if not os.path.ismount(root / "proc"):
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)


def unmount(root: Path) -> None:
    if os.path.ismount(root / "proc"):
        subprocess.run(["umount", str(root / "proc")], check=True)


def _from(args: str, stages: dict[str, Stage], base: Path, work: Path) -> Stage:
    """FROM: a new stage, a copy of the base root file system."""
    words = args.split()
    if words[0] != BASE_IMAGE:
        raise SystemExit(f"FROM {words[0]}: only {BASE_IMAGE} is made here")
    name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
    root = work / f"stage-{name}"
    if root.exists():
        raise SystemExit(f"{root} exists: a stage starts from the base, remove it first")
    subprocess.run(["cp", "-a", f"{base}/.", str(root)], check=True)
    stage = stages[name] = Stage(name, root)
    say(f"FROM {BASE_IMAGE} (stage {name}): {root}")
    mount_runtime(root)
    return stage


def _run(stage: Stage, args: str, pip_cert: Path | None) -> None:
    started = time.monotonic()
    say(f"RUN {args[:90]}{'…' if len(args) > 90 else ''}")
    (stage.root / stage.workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
    extra = {}
    secret = stage.root / "run/host-ca.pem"
    if pip_cert is not None:
        # As a build secret: for this RUN only, never in the image.
        shutil.copy(pip_cert, secret)
        extra["PIP_CERT"] = "/run/host-ca.pem"
    try:
        subprocess.run(
            ["/bin/sh", "-c", args],
            env=container_env(stage, extra),
            preexec_fn=in_root(stage),
            stdin=subprocess.DEVNULL,
            check=True,
        )
    finally:
        secret.unlink(missing_ok=True)
    say(f"  done in {time.monotonic() - started:.0f} s")


def _copy(stage: Stage, args: str, stages: dict[str, Stage]) -> None:
    words = shlex.split(args)
    origin = None
    while words[0].startswith("--"):
        flag = words.pop(0)
        if not flag.startswith("--from="):
            raise SystemExit(f"COPY {flag}: not supported here")
        origin = stages[flag.removeprefix("--from=")]
    *patterns, dest = words
    base_dir = origin.root if origin else REPO
    sources = []
    for pattern in patterns:
        found = sorted(glob.glob(str(base_dir / pattern.lstrip("/"))))
        if not found:
            raise SystemExit(f"COPY {pattern}: nothing matches")
        sources += [Path(p) for p in found]
    say(f"COPY {args}")
    copy_into(stage, sources, base_dir, dest, context=origin is None)


def _setting(stage: Stage, keyword: str, args: str) -> None:
    """The instructions that only record something in the image's configuration."""
    if keyword == "WORKDIR":
        stage.workdir = args if args.startswith("/") else f"{stage.workdir}/{args}"
        (stage.root / stage.workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
    elif keyword == "ENV":
        for word in shlex.split(args):
            key, sep, value = word.partition("=")
            if not sep:
                raise SystemExit("ENV: only the key=value form is supported here")
            stage.env[key] = value
    elif keyword == "USER":
        stage.user = args
    elif keyword == "EXPOSE":
        stage.expose += args.split()
    elif keyword == "STOPSIGNAL":
        stage.stopsignal = args
    elif keyword in ("ENTRYPOINT", "CMD"):
        setattr(stage, keyword.lower(), json.loads(args))
    elif keyword == "HEALTHCHECK":
        options, _, command = args.partition(" CMD ")
        stage.healthcheck = json.loads(command)
        stage.healthcheck_options = dict(o.lstrip("-").split("=") for o in options.split())
    else:
        raise SystemExit(f"{keyword}: not supported here")


def build(dockerfile: Path, base: Path, work: Path, pip_cert: Path | None) -> Stage:
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for keyword, args in instructions(dockerfile.read_text()):
        if keyword == "FROM":
            if stage is not None:
                unmount(stage.root)
            stage = _from(args, stages, base, work)
        elif stage is None:
            raise SystemExit(f"{keyword} before FROM")
        elif keyword == "RUN":
            _run(stage, args, pip_cert)
        elif keyword == "COPY":
            _copy(stage, args, stages)
        else:
            _setting(stage, keyword, args)
    assert stage is not None
    for other in stages.values():
        if other is not stage:
            unmount(other.root)
    return stage


# -- the check -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def listens_on_any(port: int) -> bool:
    """A listening socket on 0.0.0.0:port in /proc/net/tcp (state 0A: LISTEN)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if local == f"00000000:{port:04X}" and state == "0A":
            return True
    return False


def check(image: Stage, work: Path) -> None:
    import pika  # the check's client; the build needs only the standard library

    port, http_port = free_port(), free_port()
    # As `docker run -e LISTEN_PORT=… -e HTTP_PORT=…` would: free ports on this shared host.
    env = container_env(image, {"LISTEN_PORT": str(port), "HTTP_PORT": str(http_port)})
    say(f"image: user {image.user}, env {image.env}, expose {image.expose}")
    say(f"entrypoint {image.entrypoint}, healthcheck {image.healthcheck_options}")
    assert image.user not in ("", "root", "0") and not image.user.startswith(("root:", "0:"))
    assert image.env.get("LISTEN_ADDRESS") == "0.0.0.0", image.env
    assert sorted(image.expose) == ["15673", "5673"], image.expose
    assert image.healthcheck and "/readyz" in " ".join(image.healthcheck)

    version = subprocess.run(
        [*image.entrypoint, "--version"],
        env=env,
        preexec_fn=in_root(image),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    say(f"{version} in the image")

    def healthcheck() -> int:
        return subprocess.run(
            image.healthcheck, env=env, preexec_fn=in_root(image), capture_output=True
        ).returncode

    log_path = work / "proxy.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*image.entrypoint, "amqp://127.0.0.1:5672"],
            env=env,
            preexec_fn=in_root(image),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    queue = f"image-check-{uuid.uuid4().hex[:10]}"
    broker = pika.BlockingConnection(pika.ConnectionParameters(*BROKER))
    broker.channel().queue_declare(queue)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the proxy exited {proc.returncode}:\n{log_path.read_text()}")
            try:
                if http_status(http_port, "/healthz") == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the proxy did not get ready:\n{log_path.read_text()}")
            time.sleep(0.2)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
        gid = re.search(r"^Gid:\s+(\d+)", status, re.M)
        assert uid is not None and gid is not None and "0" not in (uid[1], gid[1]), status
        groups = [line.split(":") for line in (image.root / "etc/group").read_text().splitlines()]
        group = next((g[0] for g in groups if g[2] == gid[1]), None)
        assert group is not None, f"gid {gid[1]} is no group of the image"
        say(f"the proxy runs as uid {uid[1]}, gid {gid[1]} ({group}), listening on 0.0.0.0:{port}")
        assert listens_on_any(port), "the proxy does not listen on 0.0.0.0"

        body = f"through the image {uuid.uuid4().hex}".encode()
        params = pika.ConnectionParameters(
            "127.0.0.1", port, "/", pika.PlainCredentials("guest", "guest")
        )
        with pika.BlockingConnection(params) as conn:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish("", queue, body, mandatory=True)
        with pika.BlockingConnection(params) as conn:
            ch = conn.channel()
            got = None
            for _ in range(50):
                got = ch.basic_get(queue, auto_ack=True)[2]
                if got:
                    break
                time.sleep(0.1)
        assert got == body, got
        say("published and got a message through the proxy (confirmed by the broker)")
        assert "frame scanner: compiled" in log_path.read_text()
        say("the compiled frame scanner runs")

        assert healthcheck() == 0, "HEALTHCHECK failed while the proxy serves"
        say("HEALTHCHECK passes while the proxy serves")
        proc.send_signal(getattr(signal, image.stopsignal))
        rc = proc.wait(timeout=45)
        assert rc == 0, f"exit status {rc} after {image.stopsignal}:\n{log_path.read_text()}"
        say(f"{image.stopsignal}: drained and exited 0")
        assert healthcheck() != 0, "HEALTHCHECK passes with no proxy running"
        say("HEALTHCHECK fails once the proxy is gone")
        assert "Traceback" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        broker.channel().queue_delete(queue)
        broker.close()
    print(log_path.read_text(), end="")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="debootstrap'd root file system")
    parser.add_argument("--work", type=Path, required=True, help="directory for the stages")
    parser.add_argument("--dockerfile", type=Path, default=REPO / "Dockerfile")
    parser.add_argument(
        "--pip-cert",
        type=Path,
        help="CA bundle pip needs on a network that intercepts TLS (given to RUN as PIP_CERT)",
    )
    args = parser.parse_args()
    started = time.monotonic()
    image = build(args.dockerfile, args.base.resolve(), args.work.resolve(), args.pip_cert)
    say(f"stages built in {time.monotonic() - started:.0f} s")
    try:
        check(image, args.work.resolve())
    finally:
        unmount(image.root)
    say(f"image check passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
