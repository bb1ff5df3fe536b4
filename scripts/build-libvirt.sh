#!/bin/bash
# Configure (when needed) and build a minimal libvirt 11.3 in
# build/libvirt-build from build/libvirt-src (scripts/fetch-libvirt.sh): the
# QEMU driver with the modular daemons (virtqemud, and virtlogd, which the QEMU
# driver logs through), the remote driver, virsh, virt-host-validate, and the
# test programs make check will run.  Every other hypervisor driver, the
# network, interface, secret, nwfilter and storage drivers, docs and
# translations are off.
#
# Run from the build tree (as root; nothing is installed): libvirt's `run`
# script sets the environment that makes the programs use the build tree's
# modules and data (LIBVIRT_DIR_OVERRIDE); on a systemd host it also stops a
# system libvirt's units for the time being.
#
#   mkdir -p /var/local/log/libvirt      # the daemons' logs with --daemon
#   build/libvirt-build/run build/libvirt-build/src/virtlogd --daemon
#   build/libvirt-build/run build/libvirt-build/src/virtqemud --daemon
#   build/libvirt-build/run build/libvirt-build/tools/virsh -c qemu:///system list --all
#   build/libvirt-build/run build/libvirt-build/tools/virt-host-validate qemu
#
# (without --daemon they log to stderr).  The prefix is /usr/local
# (LIBVIRT_PREFIX=DIR changes it): configuration in /usr/local/etc/libvirt
# (qemu.conf, virtqemud.conf; none needed), state in /var/local/lib/libvirt,
# logs in /var/local/log/libvirt, sockets in /var/local/run/libvirt
# (runstatedir is set to localstatedir/run, where virsh looks), all apart
# from a system libvirt's.  The QEMU driver starts only if the user and
# group libvirt-qemu exist (Debian's default QEMU user, resolved before
# qemu.conf is read): useradd --system --no-create-home --user-group
# libvirt-qemu.  QEMU is the domain XML's <emulator>, e.g.
# build/qemu-system-x86_64 (virsh version reports no hypervisor version
# while no qemu-system-x86_64 is in PATH).
#
# An operator installs from the same build tree into the prefix:
#
#   LIBVIRT_PREFIX=/opt/mem-share/libvirt make libvirt
#   meson install -C build/libvirt-build       (DESTDIR=... for staging)
#
# which also builds the remaining default targets (the other tests) first.
#
# meson: Debian 12's (1.0.1; libvirt 11.3 wants >= 0.56), run with the
# system's python.  meson setup runs once (in a fresh directory); again when
# its options or the meson version change.  A changed source tree is ninja's
# business (it reruns meson itself when a meson.build changed).
#
#   scripts/build-libvirt.sh            configure and build
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${BUILD:-$ROOT/build}
SRC=$BUILD/libvirt-src
LB=$BUILD/libvirt-build
STAMPS=$BUILD/stamps
export PATH=/usr/bin:/bin:$PATH
PREFIX=${LIBVIRT_PREFIX:-/usr/local}
case $PREFIX in
/usr) LOCALSTATEDIR=/var ;;
/usr/local) LOCALSTATEDIR=/var/local ;;
*) LOCALSTATEDIR=$PREFIX/var ;;
esac

MESON_OPTIONS=(
    --buildtype=debugoptimized
    "--prefix=$PREFIX"
    "--localstatedir=$LOCALSTATEDIR"
    # The daemons put their sockets in runstatedir (default /run), virsh
    # looks in localstatedir/run: the same directory, and not a system
    # libvirt's /run/libvirt.
    "-Drunstatedir=$LOCALSTATEDIR/run"
    -Dtests=enabled                 # the test programs below
    -Dexpensive_tests=disabled
    -Ddocs=disabled
    -Dnls=disabled
    -Dinit_script=none
    # what we want
    -Ddriver_qemu=enabled
    -Ddriver_remote=enabled         # virsh talks to virtqemud through it
    -Ddriver_libvirtd=enabled       # the daemon code: virtqemud, virtlogd (also libvirtd)
    -Dhost_validate=enabled         # virt-host-validate
    -Djson_c=enabled                # required by the QEMU driver
    -Dselinux=enabled               # libselinux and libacl (no option: meson checks
    -Dsecdriver_selinux=enabled     #   below) are both needed for the QEMU driver's
    -Dattr=enabled                  #   private /dev namespace (qemu_namespace.c)
    -Dcapng=enabled
    -Dlibnl=enabled
    -Dudev=enabled                  # the node device driver (host devices)
    -Dpciaccess=enabled
    -Dnumactl=enabled
    -Dreadline=enabled              # virsh's shell
    -Dapparmor=enabled              # Debian's security driver and virt-aa-helper
    -Dsecdriver_apparmor=enabled    #   (inactive on a kernel without AppArmor)
    # other hypervisors
    -Ddriver_bhyve=disabled
    -Ddriver_ch=disabled
    -Ddriver_esx=disabled
    -Ddriver_hyperv=disabled
    -Ddriver_libxl=disabled
    -Ddriver_lxc=disabled
    -Ddriver_openvz=disabled
    -Ddriver_test=disabled
    -Ddriver_vbox=disabled
    -Ddriver_vmware=disabled
    -Ddriver_vz=disabled
    # other drivers: not needed by the QEMU driver to build or to run a domain
    # whose disks are files and whose NICs are not <interface type='network'>
    -Ddriver_network=disabled
    -Ddriver_interface=disabled
    -Ddriver_secrets=disabled
    -Dstorage_dir=disabled
    -Dstorage_disk=disabled
    -Dstorage_fs=disabled
    -Dstorage_gluster=disabled
    -Dstorage_iscsi=disabled
    -Dstorage_iscsi_direct=disabled
    -Dstorage_lvm=disabled
    -Dstorage_mpath=disabled
    -Dstorage_rbd=disabled
    -Dstorage_scsi=disabled
    -Dstorage_vstorage=disabled
    -Dstorage_zfs=disabled
    # optional libraries and features we do not use
    -Daudit=disabled
    -Dbash_completion=disabled
    -Dblkid=disabled
    -Dcurl=disabled
    -Ddtrace=disabled
    -Dfirewalld=disabled
    -Dfirewalld_zone=disabled
    -Dfuse=disabled
    -Dglusterfs=disabled
    -Dlibiscsi=disabled
    -Dlibpcap=disabled
    -Dlibssh=disabled
    -Dlibssh2=disabled
    -Dlogin_shell=disabled
    -Dnbdkit=disabled
    -Dnetcf=disabled
    -Dnss=disabled
    -Dnumad=disabled
    -Dpm_utils=disabled
    -Dopenwsman=disabled
    -Dpolkit=disabled
    -Dsanlock=disabled
    -Dsasl=disabled
    -Dssh_proxy=disabled
    -Dsysctl_config=disabled
    -Duserfaultfd_sysctl=disabled
    -Dwireshark_dissector=disabled
)
# Built targets, all required (besides the test mocks, found below).
TARGETS=(
    src/virtqemud
    src/virtlogd
    src/libvirt_driver_qemu.so
    tools/virsh
    tools/virt-host-validate
    src/virt-aa-helper
    src/libvirt_iohelper            # virsh save, restore, dump
    tests/qemuxmlconftest
    tests/genericxml2xmltest
    tests/qemucapabilitiestest
    tests/domaincapstest
    tests/virschematest
    tests/qemumonitorjsontest
)
# config.h symbols the build must have: mount namespaces need both ACL and
# SELinux support compiled in (else qemuDomainNamespaceAvailable() says no,
# silently, and domains share the host's /dev).
REQUIRED_CONFIG=(WITH_QEMU WITH_REMOTE WITH_LIBVIRTD WITH_LIBACL WITH_SELINUX WITH_CAPNG WITH_JSON_C WITH_LIBNL
                 WITH_SECDRIVER_APPARMOR)

log() { echo "build-libvirt: $*"; }
die() { echo "build-libvirt: error: $*" >&2; exit 1; }

[[ -f $SRC/.mem-share-version ]] || die "no unpacked source in ${SRC#$ROOT/}; run scripts/fetch-libvirt.sh"
mkdir -p "$STAMPS"

meson_version=$(meson --version)
want_stamp=$(printf '%s\n' "${MESON_OPTIONS[@]}" "meson $meson_version")
if [[ ! -f $LB/build.ninja || ! -f $STAMPS/libvirt-configure || $(cat "$STAMPS/libvirt-configure") != "$want_stamp" ]]; then
    log "meson setup (meson $meson_version; log: ${LB#$ROOT/}/setup.log)"
    rm -rf "$LB" "$STAMPS/libvirt-configure"
    mkdir -p "$LB"
    if ! meson setup "${MESON_OPTIONS[@]}" "$LB" "$SRC" >"$BUILD/libvirt-setup.log" 2>&1 </dev/null; then
        tail -40 "$BUILD/libvirt-setup.log" >&2
        mv "$BUILD/libvirt-setup.log" "$LB/setup.log"
        die "meson setup failed (log: ${LB#$ROOT/}/setup.log)"
    fi
    mv "$BUILD/libvirt-setup.log" "$LB/setup.log"
    missing=()
    for s in "${REQUIRED_CONFIG[@]}"; do
        grep -q "^#define $s 1" "$LB/meson-config.h" || missing+=("$s")
    done
    ((${#missing[@]} == 0)) || die "configured without ${missing[*]} (see ${LB#$ROOT/}/setup.log)"
    echo "$want_stamp" >"$STAMPS/libvirt-configure"
fi

# The mock libraries the tests LD_PRELOAD (no link dependency: ninja would
# not build them for the tests alone).
mapfile -t MOCKS < <(ninja -C "$LB" -t targets all 2>/dev/null | sed -n 's/^\(tests\/lib[^:]*\.so\): .*/\1/p' | LC_ALL=C sort -u)
((${#MOCKS[@]})) || die "no test mock libraries in ${LB#$ROOT/}"
known=$(ninja -C "$LB" -t targets all 2>/dev/null | sed 's/:.*//')
missing=()
for t in "${TARGETS[@]}"; do
    grep -qxF "$t" <<<"$known" || missing+=("$t")
done
((${#missing[@]} == 0)) || die "no ninja target ${missing[*]} in ${LB#$ROOT/}"

ninja -C "$LB" ${NINJA_JOBS:+-j "$NINJA_JOBS"} "${TARGETS[@]}" "${MOCKS[@]}"
