#!/usr/bin/env bash
# Checks the container image on a machine without a container engine: makes debian:bookworm-slim
# as Debian's images are made (debootstrap --variant=minbase, slim's dpkg excludes), runs the
# Dockerfile's instructions in copies of it (packaging/image_check.py, with chroot), then starts
# the image's entry point as its user and checks: it listens on 0.0.0.0, a message published
# through it reaches the broker and comes back, the compiled scanner runs, HEALTHCHECK passes,
# SIGTERM exits 0, HEALTHCHECK then fails.
#
#   sudo bash packaging/check-image.sh [WORKDIR]      (default: build/image; about 5 minutes)
#
# Needs root, debootstrap, Debian's mirror, PyPI, a python3 with pika (pip install -e
# '.[test]') and RabbitMQ on 127.0.0.1:5672 (guest). WORKDIR is removed first and at the end
# (KEEP=1 keeps it). Mounts live in a private mount namespace and end with the check.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$repo/build/image}
python=${PYTHON:-python3}
mirror=${MIRROR:-http://deb.debian.org/debian}

[ "$(id -u)" -eq 0 ] || { echo "check-image.sh: run it as root (chroot, mount)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "check-image.sh: apt-get install debootstrap" >&2; exit 1; }
"$python" -c 'import pika' 2>/dev/null || { echo "check-image.sh: $python has no pika" >&2; exit 1; }

cleanup() {
    # --one-file-system: never follow a mount (there is none left outside the namespace).
    [ "${KEEP:-0}" = 1 ] || rm -rf --one-file-system "$work"
}
rm -rf --one-file-system "$work"
mkdir -p "$work"
trap cleanup EXIT

started=$(date +%s)
echo "check-image: debootstrap --variant=minbase bookworm ($mirror)"
debootstrap --variant=minbase bookworm "$work/base" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -20 "$work/debootstrap.log" >&2
    exit 1
}
# What the debian:bookworm-slim image adds to a minbase system: its updates and security
# suites, and dpkg excludes for documentation (debuerreotype's slimify).
cat >"$work/base/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
cat >"$work/base/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
path-exclude /usr/share/lintian/*
EOF
rm -rf "$work/base/var/cache/apt/archives/"*.deb "$work/base/var/lib/apt/lists/"*
echo "check-image: base made in $(($(date +%s) - started)) s"

# Where this host's pip needs a CA bundle of its own (PIP_CERT: a network that intercepts TLS),
# pip in the RUN steps gets it too, as a build secret would give it: not kept in the image.
pip_cert=()
[ -n "${PIP_CERT:-}" ] && pip_cert=(--pip-cert "$PIP_CERT")
unshare --mount --propagation private \
    "$python" "$repo/packaging/image_check.py" --base "$work/base" --work "$work" \
    --dockerfile "$repo/Dockerfile" "${pip_cert[@]}"
echo "check-image: passed in $(($(date +%s) - started)) s ($(date -u +%Y-%m-%d))"
