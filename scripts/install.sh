#!/usr/bin/env bash
# Idempotent set-up of a Debian machine for beekeeper: system packages, the Python
# environment, kernel interfaces for eBPF, and the Go-built local control plane.
# Safe to run again: every step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[install] %s\n' "$*" >&2; }

# bcc (compiler + Python module) and kernel headers for users' source programs, bpftool, clang and
# libbpf-dev to build bpf/ C,
# iproute2/iptables for the network test rig, gcc/make for test binaries, Go for the control plane,
# debootstrap/buildah/skopeo to build the container image without Docker or a registry, nft for the test rig.
PACKAGES=(python3-bpfcc bpftool linux-headers-amd64 clang clang-14 llvm libbpf-dev iproute2 iptables gcc make kmod
    debootstrap buildah skopeo nftables)
# The real-node test rig: container runtime, CNI plugins (ptp).
PACKAGES+=(containerd runc containernetworking-plugins)
# Lua 5.1 (what Argo CD's gopher-lua implements): the tests run the chart's Argo CD health scripts.
PACKAGES+=(lua5.1)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "Debian packages present"
fi
command -v go >/dev/null || { say "Go >= 1.24 is required to build the control plane (install golang-go or Go from go.dev)"; exit 1; }

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    say "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
say "installing beekeeper and test tools into .venv"
# constraints.txt pins the whole dependency set; the container image installs the same one.
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,bench]'

# bcc is not on PyPI: expose only Debian's bcc module to the venv, not all of dist-packages.
shim=.venv/system-bcc
mkdir -p "$shim"
ln -sfn /usr/lib/python3/dist-packages/bcc "$shim/bcc"
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/$shim" >"$site/system-bcc.pth"
.venv/bin/python -c 'import bcc' || { say "bcc is not importable from .venv"; exit 1; }

# beekeeper's own datapath (bpf/*.c) ships compiled; rebuilt only when its C changed.
say "building bpf/*.o with clang"
.venv/bin/python scripts/build_bpf.py

.venv/bin/beekeeper dev prepare-host
.venv/bin/beekeeper dev build >/dev/null
say "ready"
