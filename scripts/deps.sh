#!/bin/bash
# Install the Debian packages the build and the tests need, if missing.
# Prints nothing when everything is already installed.
# The list lives here only: add a package on its own line.
#
#   scripts/deps.sh          the packages of `make` and `make check`
#   scripts/deps.sh libvirt  those plus the ones libvirt 11.3 needs
#                            (`make libvirt`, scripts/build-libvirt.sh)
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
    # make install: the broker's manual page (rst2man); tests/guest/test-install
    # checks the installed units (systemd-analyze verify and security, which
    # need no running systemd) and renders the page (groff)
    python3-docutils
    systemd
    groff-base
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

# libvirt 11.3 (`make libvirt` only): what scripts/build-libvirt.sh's meson
# options need beyond the list above.  glib, libselinux, numa, readline,
# python3 and perl come with the list above or with Debian 12's base.
LIBVIRT_PACKAGES=(
    xsltproc        # required programs of libvirt's meson.build
    libxml2-utils   # (xmllint)
    libxml2-dev
    libgnutls28-dev
    libtirpc-dev    # XDR for the remote driver and the daemons' RPC
    libjson-c-dev   # the QEMU driver's QMP and capabilities parsing
    libnl-3-dev     # host network devices (the QEMU driver's interfaces)
    libnl-route-3-dev
    libacl1-dev     # with libselinux1-dev: the QEMU driver copies ACLs and
    libselinux1-dev # SELinux labels into a domain's private /dev namespace
    libcap-ng-dev   # capabilities of the QEMU processes
    libudev-dev     # node device enumeration
    libpciaccess-dev
    libreadline-dev # virsh's interactive shell
    libapparmor-dev # virt-aa-helper, Debian's security driver (its test runs
                    # here, without AppArmor in the kernel)
)

case ${1:-} in
"") ;;
libvirt) PACKAGES+=("${LIBVIRT_PACKAGES[@]}") ;;
*) echo "usage: $0 [libvirt]" >&2; exit 2 ;;
esac

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
