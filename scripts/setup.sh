#!/usr/bin/env bash
# One-command, idempotent set-up of everything fogmig needs on a Debian 12 machine:
# Debian packages, a working CRIU >= 4.2 (built from Debian's source package when the system
# one is too old), the sysctls of CRIU's lazy page server, the Python environment and the
# service image. Fast the second time: every step checks before it acts.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3.11}
CACHE=${FOGMIG_CACHE_DIR:-/var/cache/fogmig}
CRIU_VERSION=4.2.1
CRIU_DEB_VERSION=4.2.1-1
CRIU_MIN=4.2

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
fail() {
    printf '\033[31msetup failed in step "%s"\033[0m: %s\n' "$CURRENT" "$1" >&2
    [ -n "${2:-}" ] && printf 'what to do: %s\n' "$2" >&2
    exit 1
}
trap 'fail "command failed (line $LINENO): $BASH_COMMAND" "read the output above; re-run \`make setup\` once fixed"' ERR

[ "$(id -u)" -eq 0 ] || { CURRENT=preflight; fail "fogmig's set-up needs root (runc, CRIU, namespaces)" "run it as root"; }

# --- Debian packages -------------------------------------------------------------------------
CURRENT="debian packages"
# openssh-server/-client and rsync: `fogmig baseline` copies images as the paper did, with an
# sshd of its own in a node's namespace (the system's ssh service is not needed).
PACKAGES=(runc mosquitto mosquitto-clients iptables iproute2 iperf3 debootstrap libcoap3-bin
          rsync openssh-client openssh-server util-linux procps conntrack build-essential pkg-config dpkg-dev
          libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf
          libnl-3-dev libcap-dev libnet1-dev libbsd-dev libnftables-dev libgnutls28-dev uuid-dev
          libaio-dev)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
if [ ${#missing[@]} -gt 0 ]; then
    step "installing Debian packages: ${missing[*]}"
    apt-get update -q || fail "apt-get update failed" "check the machine's apt sources (/etc/apt/sources.list.d)"
    # Only this machine's own suite, and no recommends: never drag in a newer libc.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t "$SUITE" --no-install-recommends "${missing[@]}" \
        || fail "apt-get install failed" "install by hand: apt-get install -t $SUITE ${missing[*]}"
else
    step "Debian packages: all present"
fi

# --- CRIU ------------------------------------------------------------------------------------
CURRENT="criu"
criu_ok() {
    command -v criu >/dev/null 2>&1 || return 1
    local v
    v=$(criu --version 2>/dev/null | awk '/^Version:/{print $2}')
    [ -n "$v" ] || return 1
    [ "$(printf '%s\n%s\n' "$CRIU_MIN" "$v" | sort -V | head -n1)" = "$CRIU_MIN" ] || return 1
    criu check >/dev/null 2>&1
}
if criu_ok; then
    step "CRIU: $(criu --version | awk '/^Version:/{print $2}') works"
else
    step "CRIU: building $CRIU_VERSION from Debian's source package"
    # The mirror comes from this machine's own apt configuration, never from the repository.
    URI=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$URI" ] || URI=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$URI" ] || fail "no Debian mirror found in the apt configuration" "add one to /etc/apt/sources.list.d"
    SRC_LIST=/etc/apt/sources.list.d/fogmig-criu-src.sources
    if [ ! -f "$SRC_LIST" ]; then
        # Only a deb-src entry: a binary entry for unstable would upgrade libc and friends later.
        printf 'Types: deb-src\nURIs: %s\nSuites: unstable\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$URI" > "$SRC_LIST"
    fi
    mkdir -p "$CACHE/criu-src"
    cd "$CACHE/criu-src"
    if [ ! -f "criu_${CRIU_VERSION}.orig.tar.xz" ]; then
        apt-get update -q >/dev/null || fail "apt-get update failed" "check $SRC_LIST"
        # The debian.tar.xz may 404 on the mirror; the orig tarball is all the build needs.
        apt-get source --download-only "criu=$CRIU_DEB_VERSION" || true
        [ -f "criu_${CRIU_VERSION}.orig.tar.xz" ] || fail "could not fetch criu_${CRIU_VERSION}.orig.tar.xz" \
            "check that the mirror's unstable suite has criu $CRIU_DEB_VERSION (apt-cache showsrc criu)"
    fi
    rm -rf "criu-$CRIU_VERSION"
    tar xf "criu_${CRIU_VERSION}.orig.tar.xz"
    make -C "criu-$CRIU_VERSION" -j"$(nproc)" criu >"$CACHE/criu-src/build.log" 2>&1 \
        || fail "CRIU build failed" "see $CACHE/criu-src/build.log"
    install -m 0755 "criu-$CRIU_VERSION/criu/criu" /usr/local/sbin/criu
    hash -r
    criu_ok || fail "the built CRIU does not pass \`criu check\`" "run \`criu check\` to see why"
    step "CRIU: $(criu --version | awk '/^Version:/{print $2}') installed in /usr/local/sbin"
fi

# --- sysctls ---------------------------------------------------------------------------------
CURRENT="sysctls"
# CRIU's lazy page server tees pages through big pipes ("page-pipe: tee: ... not permitted").
[ "$(cat /proc/sys/fs/pipe-max-size)" -ge 8388608 ] || echo 8388608 > /proc/sys/fs/pipe-max-size
echo 0 > /proc/sys/fs/pipe-user-pages-soft
step "sysctls: pipe-max-size=$(cat /proc/sys/fs/pipe-max-size) pipe-user-pages-soft=$(cat /proc/sys/fs/pipe-user-pages-soft)"

# --- Python environment ----------------------------------------------------------------------
CURRENT="python environment"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' \
    || fail "Python 3.11 or newer is needed, found $("$PYTHON" --version)" "install python3.11"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
STAMP="$VENV/.fogmig-installed"
WANT=$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    step "installing the Python environment in $VENV"
    "$VENV/bin/pip" install -q -e "$ROOT[dev]" || fail "pip install failed" "read pip's message above"
    echo "$WANT" > "$STAMP"
else
    step "Python environment: up to date"
fi

# --- service image ---------------------------------------------------------------------------
CURRENT="service image"
"$VENV/bin/fogmig" image build || fail "could not build the service image" "see the message above; \`fogmig image build -v\` shows every step"

CURRENT="done"
step "set-up complete: \`$VENV/bin/fogmig doctor\` explains the machine"
