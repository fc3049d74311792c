#!/usr/bin/env bash
# Installs what tests/clients needs on a fresh Debian machine; idempotent and quiet.
#   apt: php-cli php-amqplib amqp-tools nodejs npm (skipped when already there)
#   pip: pika aio-pika amqp kombu (+ pytest, pytest-timeout)
#   npm: `npm ci` in tests/clients/node (amqplib, pinned by package-lock.json)
set -euo pipefail
cd "$(dirname "$0")"

export DEBIAN_FRONTEND=noninteractive
missing=()
command -v php >/dev/null 2>&1 || missing+=(php-cli)
[ -f /usr/share/php/PhpAmqpLib/autoload.php ] || missing+=(php-amqplib)
command -v amqp-publish >/dev/null 2>&1 || missing+=(amqp-tools)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
"$PY" -m pip install -q --disable-pip-version-check \
    "pika>=1.3,<2" "aio-pika>=9.4,<11" "amqp>=5.2,<6" "kombu>=5.3,<6" \
    "pytest>=8,<10" "pytest-timeout>=2.2,<3" 2>&1 | grep -v -i "running pip as the 'root' user" || true

cd node
want=$(node -p "require('./package-lock.json').packages['node_modules/amqplib'].version")
have=$(node -p "try { require('./node_modules/amqplib/package.json').version } catch (e) { '' }")
if [ "$want" != "$have" ]; then
    npm ci --no-audit --no-fund --loglevel=error >/dev/null
fi
