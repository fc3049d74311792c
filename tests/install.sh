#!/usr/bin/env bash
# Installs what the test suites need on a fresh Debian machine; idempotent and quiet.
#   apt: a C compiler and this Python's headers (the compiled frame scanner a unit test checks
#        for), RabbitMQ (when missing; tests/conftest.py starts it if nothing answers on
#        127.0.0.1:5672), and the real clients: php-cli php-amqplib amqp-tools nodejs npm
#   npm: `npm ci` in tests/clients/node (amqplib, pinned by package-lock.json)
#   packaging/build-deps.sh: what tests/packaging needs to build and check the Debian package
# Python packages come from the project: pip install -e '.[test]'.
set -euo pipefail
cd "$(dirname "$0")"

export DEBIAN_FRONTEND=noninteractive
PY="${PYTHON:-python3}"
missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc)
"$PY" -c 'import os, sysconfig; exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || missing+=(python3-dev)
command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ] || missing+=(rabbitmq-server)
command -v php >/dev/null 2>&1 || missing+=(php-cli)
[ -f /usr/share/php/PhpAmqpLib/autoload.php ] || missing+=(php-amqplib)
command -v amqp-publish >/dev/null 2>&1 || missing+=(amqp-tools)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "tests/install.sh: installing ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cd clients/node
want=$(node -p "require('./package-lock.json').packages['node_modules/amqplib'].version")
have=$(node -p "try { require('./node_modules/amqplib/package.json').version } catch (e) { '' }")
if [ "$want" != "$have" ]; then
    npm ci --no-audit --no-fund --loglevel=error >/dev/null
fi

# tests/packaging builds, installs and removes the Debian package: its build tools and lintian.
cd ../..
bash ../packaging/build-deps.sh
