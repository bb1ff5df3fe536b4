#!/bin/bash
# Install the Debian packages the build and the tests need, if missing.
# Prints nothing when everything is already installed.
# The list lives here only: add a package on its own line.
set -euo pipefail

PACKAGES=(
    # toolchain and build system
    build-essential
    ninja-build
    meson
    pkg-config
    python3
    dpkg-dev        # dpkg-source, to unpack Debian's qemu source package
    patch
    xz-utils
    git
    make
    # QEMU build dependencies (the configure options we enable)
    libglib2.0-dev
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
    # firmware found through --firmwarepath at run time
    seabios
    ipxe-qemu
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
