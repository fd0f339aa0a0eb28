#!/usr/bin/env bash
# Installs everything dwcp-migrate needs on a fresh Debian 12 machine, as root:
#   - apt packages (QEMU 10 + libvirt 11.3 from bookworm-backports, guest kernel, build tools)
#   - QEMU 7.2 unpacked beside it (stream-format tests only), under .cache/qemu72
#   - the test guests (bare-metal and Linux) and the WAN forwarder, under .cache/build
#   - a virtual environment in .venv with the project installed editable and its test tools
# Idempotent: a second run only checks and returns quickly.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh must run as root (it installs apt packages and later creates namespaces)" >&2
    exit 1
fi
if ! grep -q 'VERSION_CODENAME=bookworm' /etc/os-release; then
    echo "setup.sh supports Debian 12 (bookworm) only; found: $(grep PRETTY_NAME /etc/os-release)" >&2
    exit 1
fi

stamp_dir="$repo/.cache/stamps"
mkdir -p "$stamp_dir"

# ---- apt ------------------------------------------------------------------------------
backports=/etc/apt/sources.list.d/dwcp-bookworm-backports.sources
apt_packages=(
    busybox-static cpio gcc gcc-multilib make pkg-config socat iproute2 zstd procps psmisc
    linux-image-amd64 python3-venv python3-dev python3-pyverbs ca-certificates iperf3
    iputils-ping util-linux iptables
)
backport_packages=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev)

if [ ! -f "$stamp_dir/apt" ] || ! command -v qemu-system-x86_64 >/dev/null || ! command -v libvirtd >/dev/null \
        || ! command -v iptables >/dev/null; then
    if [ ! -f "$backports" ]; then
        # Use whichever Debian mirror the machine already has configured.
        mirror=$(grep -hoE 'https?://[^ ]*/debian/?$' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n1 || true)
        mirror=${mirror:-http://deb.debian.org/debian}
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$mirror" >"$backports"
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Debian's libvirtd postinst tries to start services; there is no systemd here, that's fine.
    apt-get install -y -q --no-install-recommends "${apt_packages[@]}" >/dev/null
    apt-get install -y -q --no-install-recommends -t bookworm-backports "${backport_packages[@]}" >/dev/null
    touch "$stamp_dir/apt"
fi

# ---- QEMU 7.2 beside the backports QEMU (stream-format tests) ---------------------------
qemu72="$repo/.cache/qemu72"
if [ ! -x "$qemu72/usr/bin/qemu-system-x86_64" ]; then
    tmp=$(mktemp -d)
    chmod 755 "$tmp"  # apt's _apt user downloads into it
    # The version TESTBED.md was checked with; if the mirror has moved on, bookworm's current.
    if ! (cd "$tmp" && apt-get download -q \
            'qemu-system-x86=1:7.2+dfsg-7+deb12u18+b3' \
            'qemu-system-common=1:7.2+dfsg-7+deb12u18+b3' \
            'qemu-system-data=1:7.2+dfsg-7+deb12u18' >/dev/null 2>&1); then
        rm -f "$tmp"/*.deb
        (cd "$tmp" && apt-get download -q qemu-system-x86/bookworm qemu-system-common/bookworm \
            qemu-system-data/bookworm >/dev/null)
    fi
    mkdir -p "$qemu72"
    for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$qemu72"; done
    rm -rf "$tmp"
fi

# ---- host TCP settings the test bed relies on -------------------------------------------
# Namespaces may only pick congestion controls the root namespace allows.
sysctl -q -w net.ipv4.tcp_allowed_congestion_control="reno cubic bbr" || true

# ---- Python virtual environment ---------------------------------------------------------
# Made from Debian's own interpreter with system site packages so that Debian's
# python3-pyverbs (the only pyverbs that imports against Debian's libibverbs) is visible.
venv="$repo/.venv"
if [ ! -x "$venv/bin/python" ]; then
    /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
if [ ! -f "$stamp_dir/pip" ] || [ pyproject.toml -nt "$stamp_dir/pip" ]; then
    # pip's output goes to a log that is shown only when it fails.
    pip_log="$repo/.cache/pip.log"
    if ! { "$venv/bin/pip" install -q --upgrade pip && "$venv/bin/pip" install -q -e ".[dev]"; } \
            >"$pip_log" 2>&1; then
        tail -n 40 "$pip_log" >&2
        echo "setup.sh: pip install failed (full log: $pip_log)" >&2
        exit 1
    fi
    touch "$stamp_dir/pip"
fi

# ---- guests and tools built from source -------------------------------------------------
"$venv/bin/python" -m dwcp_migrate.testbed.build --quiet

echo "setup complete: $(qemu-system-x86_64 --version | head -n1); $(libvirtd --version)"
