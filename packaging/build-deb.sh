#!/usr/bin/env bash
# Builds amqproxy_<version>_<arch>.deb:
#   /opt/amqproxy        a virtual environment on Debian's python3.11: the proxy (with its
#                        compiled frame scanner) and its dependencies, nothing else
#   /usr/bin/amqproxy    -> /opt/amqproxy/bin/amqproxy
#   /lib/systemd/system/amqproxy.service, /etc/amqproxy/amqproxy.ini (a conffile), a man page
#
#   bash packaging/build-deb.sh [OUTDIR]        (default OUTDIR: build/deb)
#
# Everything it writes, the pip cache included, stays in OUTDIR. Needs the packages that
# packaging/build-deps.sh installs, and PyPI (the dependencies, setuptools for the build).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out=$(mkdir -p "${1:-$repo/build/deb}" && cd "${1:-$repo/build/deb}" && pwd)
# Debian's interpreter, not whichever python3 is first on PATH: the environment is bound to
# the interpreter it was made with, and the target has this one.
py=/usr/bin/python3.11

missing=$(bash "$here/build-deps.sh" --check)
if [ -n "$missing" ]; then
    echo "build-deb.sh: missing $missing; run: bash packaging/build-deps.sh" >&2
    exit 1
fi

version=$("$py" -c 'import sys, tomllib; print(tomllib.load(sys.stdin.buffer)["project"]["version"])' \
    <"$repo/pyproject.toml")
arch=$(dpkg --print-architecture)
deb="$out/amqproxy_${version}_${arch}.deb"
maintainer=${DEB_MAINTAINER:-amqproxy maintainers <maintainers@users.noreply.r-seed-124fe43f.example>}
# One timestamp for every file and the changelog: the same tree gives the same package.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)}

work="$out/work"
root="$work/root"
venv="$root/opt/amqproxy"
rm -rf "$work" "$deb"
mkdir -p "$work/src" "$work/wheels"

# A copy of the sources: an in-tree build would reuse a stale build/ or a scanner compiled
# for another interpreter (src/amqproxy/amqp/_scan.*.so of an editable install).
tar -C "$repo" --exclude=__pycache__ --exclude='*.so' --exclude='*.egg-info' \
    -cf - pyproject.toml setup.py README.md src | tar -C "$work/src" -xf -

export PIP_CACHE_DIR="$out/pip-cache" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$py" -m venv "$venv"
vpy="$venv/bin/python3"
# The wheel is built once (the C scanner compiled here, against this interpreter's headers)
# and installed from the file, with the dependencies at the versions the tests ran with.
# Debian's hardening flags (relro, bindnow, fortify, stack protector) for the scanner.
eval "$(DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --export=sh)"
"$vpy" -m pip wheel -q --no-deps -w "$work/wheels" "$work/src"
wheel=$(ls "$work"/wheels/amqproxy-*.whl)
"$py" -m zipfile -l "$wheel" | grep '_scan\.cpython-311-.*\.so' >/dev/null || {
    echo "build-deb.sh: the wheel has no compiled frame scanner (see the pip output)" >&2
    exit 1
}
"$vpy" -m pip install -q --no-compile -c "$here/constraints.txt" "$wheel"
# The environment only runs the proxy: no installer inside it.
"$vpy" -m pip uninstall -q -y pip setuptools
rm -rf "$venv"/bin/activate* "$venv"/bin/Activate.ps1 "$venv/include"
find "$venv" -name direct_url.json -delete   # it names the build directory
find "$venv" -name '*.so' -exec strip --strip-unneeded --remove-section=.comment \
    --remove-section=.note {} +

# The paths pip and venv wrote name the build directory: point them at the installed one.
sed -i "1s|^#!.*|#!/opt/amqproxy/bin/python3|" "$venv/bin/amqproxy"
sed -i "s|$venv|/opt/amqproxy|g" "$venv/pyvenv.cfg"
if grep -rIl "$root" "$root"; then
    echo "build-deb.sh: the files above still name the build directory" >&2
    exit 1
fi
# Every module must compile: postinst compiles them on the target. Checked here, then dropped.
"$vpy" -m compileall -q "$venv/lib" >/dev/null
find "$venv" -type d -name __pycache__ -prune -exec rm -rf {} +

install -d "$root/usr/bin" "$root/etc/amqproxy" "$root/lib/systemd/system" \
    "$root/usr/share/doc/amqproxy" "$root/usr/share/man/man1" "$root/usr/share/lintian/overrides"
ln -s /opt/amqproxy/bin/amqproxy "$root/usr/bin/amqproxy"
install -m 644 "$here/amqproxy.ini" "$root/etc/amqproxy/amqproxy.ini"
install -m 644 "$here/amqproxy.service" "$root/lib/systemd/system/amqproxy.service"
install -m 644 "$here/deb/copyright" "$root/usr/share/doc/amqproxy/copyright"
install -m 644 "$here/deb/lintian-overrides" "$root/usr/share/lintian/overrides/amqproxy"
gzip -9n <"$repo/README.md" >"$root/usr/share/doc/amqproxy/README.md.gz"
{
    echo "amqproxy ($version) unstable; urgency=medium"
    echo
    echo "  * Package built from the amqproxy repository; its history is the git log."
    echo
    echo " -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$root/usr/share/doc/amqproxy/changelog.gz"

# The man page: a fixed text, and the options as --help prints them (so they cannot drift).
COLUMNS=80 "$vpy" -B -m amqproxy --help >"$work/help.txt"
"$py" - "$here/deb/amqproxy.1.in" "$work/help.txt" "$version" <<'PY' | gzip -9n >"$root/usr/share/man/man1/amqproxy.1.gz"
import datetime, os, sys

template, help_file, version = sys.argv[1:]
date = datetime.datetime.fromtimestamp(int(os.environ["SOURCE_DATE_EPOCH"]), datetime.UTC)
lines = []
for line in open(help_file).read().splitlines():
    line = line.replace("\\", "\\e").replace("-", "\\-")
    lines.append("\\&" + line if line.startswith((".", "'")) else line)
text = open(template).read()
text = text.replace("@DATE@", date.strftime("%Y-%m-%d")).replace("@VERSION@", version)
sys.stdout.write(text.replace("@OPTIONS@", "\n".join(lines)))
PY

chmod -R u=rwX,go=rX "$root"
install -d -m 755 "$root/DEBIAN"
install -m 755 "$here/deb/postinst" "$here/deb/prerm" "$here/deb/postrm" "$root/DEBIAN/"
echo /etc/amqproxy/amqproxy.ini >"$root/DEBIAN/conffiles"

# Depends: the interpreter the environment is bound to, and the C libraries the compiled
# modules (the scanner, uvloop) link against, as dpkg-shlibdeps finds them.
mkdir -p "$work/debian" && touch "$work/debian/control"
mapfile -t objects < <(find "$venv" -name '*.so')
shlibs=$(cd "$work" && dpkg-shlibdeps -O "${objects[@]}" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
cat >"$root/DEBIAN/control" <<EOF
Package: amqproxy
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: python3.11, $shlibs
Recommends: ca-certificates
Section: net
Priority: optional
Description: pooling AMQP 0-9-1 proxy for short-lived clients
 amqproxy runs next to clients that connect, publish and disconnect (PHP-FPM
 workers, CGI scripts, cron jobs) and keeps connections and clean channels to a
 remote RabbitMQ open between them, so a short-lived publisher pays loopback
 round trips instead of WAN ones. Each client authenticates with its own
 credentials; published messages are kept until the broker confirms them.
 .
 The proxy and its Python dependencies live in a virtual environment under
 /opt/amqproxy that uses Debian's python3.11. The systemd unit amqproxy.service
 is installed but not enabled: set the upstream in /etc/amqproxy/amqproxy.ini,
 then run "systemctl enable --now amqproxy".
EOF
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
    xargs -0 md5sum >DEBIAN/md5sums)
chmod 644 "$root/DEBIAN/md5sums" "$root/DEBIAN/conffiles" "$root/DEBIAN/control"
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
rm -rf "$work"
echo "$deb"
