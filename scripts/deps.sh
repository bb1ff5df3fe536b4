#!/bin/bash
# Install the Debian packages the build and the tests need, if missing.
# Prints nothing when everything is already installed.
# The list lives here only: add a package on its own line.
set -euo pipefail

PACKAGES=(
    # toolchain and build system
    build-essential
    ninja-build
    meson           # the engine's build; QEMU 10.0 wants meson >= 1.5, which
                    # scripts/fetch-qemu.sh takes from bookworm-backports
    pkg-config
    python3
    python3-venv    # QEMU's configure sets up a venv (ensurepip without pip)
    python3-distlib # its mkvenv matches versions and writes scripts with distlib
    dpkg-dev        # dpkg-source, to unpack Debian's qemu source package
    patch
    xz-utils
    git
    make
    # QEMU 10.0 build dependencies (the configure options we enable)
    libglib2.0-dev  # QEMU 10.0 wants glib >= 2.66; Debian 12 has 2.74
    libpixman-1-dev
    libfdt-dev
    zlib1g-dev
    libslirp-dev
    libaio-dev
    liburing-dev
    libnuma-dev
    libselinux1-dev
    # mem-share engine
    libxxhash-dev
    # firmware found through --firmwarepath at run time: ipxe-qemu's ROMs;
    # seabios >> 1.16.3 comes from bookworm-backports (build/tools/seabios),
    # Debian 12's seabios is the fallback
    seabios
    ipxe-qemu
    binutils        # ld, objcopy: the x86 option ROMs (gcc -m16, no multilib)
    # plots, fuzzing and sanitizers
    gnuplot-nox
    clang
    libclang-rt-14-dev
)

missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$p")
done
((${#missing[@]} == 0)) && exit 0

echo "deps: installing ${missing[*]}"
if [[ $(id -u) != 0 ]]; then
    echo "deps: not root; install these packages first: ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
