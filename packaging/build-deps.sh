#!/usr/bin/env bash
# Installs, on Debian and only where missing, what packaging/build-deb.sh and
# tests/packaging/test_deb.py need: Debian's python3.11 with venv and headers, a C compiler,
# dpkg-dev (dpkg-shlibdeps), systemd (systemd-analyze) and lintian.
#   bash packaging/build-deps.sh            install what is missing
#   bash packaging/build-deps.sh --check    print what the build lacks, install nothing
set -euo pipefail

py=/usr/bin/python3.11
missing=()
[ -x "$py" ] || missing+=(python3.11)
[ -x "$py" ] && "$py" -c 'import ensurepip' 2>/dev/null || missing+=(python3.11-venv)
[ -f /usr/include/python3.11/Python.h ] || missing+=(python3.11-dev)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v dpkg-shlibdeps >/dev/null 2>&1 || missing+=(dpkg-dev)
if [ "${1:-}" = --check ]; then
    echo "${missing[*]}"
    exit 0
fi
# The test's tools, not the build's.
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v lintian >/dev/null 2>&1 || missing+=(lintian)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "packaging/build-deps.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
