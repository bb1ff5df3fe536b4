#!/bin/bash
# Configure (when needed) and build QEMU in build/qemu-build from build/qemu-src.
#
# configure runs once; again only when its flags or the patch series change
# (the stamp build/stamps/configure holds both).  ninja decides what to
# rebuild, so running this with nothing changed does no work.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${BUILD:-$ROOT/build}
SRC=$BUILD/qemu-src
QB=$BUILD/qemu-build
STAMPS=$BUILD/stamps
# The system's python and meson: the pyenv python3 on PATH must not be used.
export PATH=/usr/bin:$PATH

# Firmware directories of Debian's seabios and ipxe-qemu packages; the first
# one (not a Debian directory without the qemu-system-data package) receives
# our option ROMs inside the build tree's qemu-bundle/ (see below).
FIRMWARE_PATH=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu

CONFIGURE_FLAGS=(
    --target-list=x86_64-softmmu
    --enable-kvm
    --enable-tcg
    --meson=meson
    --disable-docs
    --enable-slirp
    --enable-linux-aio
    --enable-linux-io-uring
    --enable-numa
    --disable-install-blobs
    --firmwarepath=$FIRMWARE_PATH
)
# Targets always built; mem-share-test is added once the patch series adds it.
TARGETS=(
    qemu-system-x86_64
    qemu-img
    tests/qtest/qom-test
    tests/qtest/qmp-cmd-test
    tests/qtest/test-hmp
    tests/qtest/device-introspect-test
)
OPTIONAL_TARGETS=(tests/qtest/mem-share-test)

log() { echo "build-qemu: $*"; }
die() { echo "build-qemu: error: $*" >&2; exit 1; }

[[ -f $SRC/.mem-share-overlay/patches.hash ]] || die "source tree not prepared; run scripts/overlay.sh"
mkdir -p "$STAMPS" "$QB"

want_stamp=$(printf '%s\n' "${CONFIGURE_FLAGS[@]}" "patches $(cat "$SRC/.mem-share-overlay/patches.hash")")
if [[ ! -f $QB/build.ninja || ! -f $STAMPS/configure || $(cat "$STAMPS/configure") != "$want_stamp" ]]; then
    log "configure (log: ${QB#$ROOT/}/configure.log)"
    rm -f "$STAMPS/configure"
    if ! (cd "$QB" && ../qemu-src/configure "${CONFIGURE_FLAGS[@]}") >"$QB/configure.log" 2>&1 </dev/null; then
        tail -40 "$QB/configure.log" >&2
        die "configure failed"
    fi
    echo "$want_stamp" >"$STAMPS/configure"
fi

# Let meson regenerate build.ninja first if an overlaid meson.build changed,
# so that the target list below is current.
if ! out=$(ninja -C "$QB" build.ninja 2>&1); then
    echo "$out" >&2
    die "meson could not regenerate build.ninja"
fi

targets=("${TARGETS[@]}")
known=$(ninja -C "$QB" -t targets all 2>/dev/null | sed 's/:.*//')
for t in "${OPTIONAL_TARGETS[@]}"; do
    grep -qxF "$t" <<<"$known" && targets+=("$t")
done

ninja -C "$QB" ${NINJA_JOBS:+-j "$NINJA_JOBS"} "${targets[@]}"

# x86 option ROMs (for -kernel, multiboot, PVH, kvmvapic): not shipped as
# binaries in Debian's dfsg source, so build them with Debian's own makefile.
# QEMU finds pc-bios/ next to its executable in a build tree.
OPTROM=$QB/pc-bios/optionrom
mkdir -p "$OPTROM"
if ! out=$(make -s -f "$SRC/debian/optionrom.mak" -C "$OPTROM" SRC_PATH="$SRC" 2>&1); then
    echo "$out" >&2
    die "building option ROMs failed"
fi
for f in "$OPTROM"/*.bin; do
    cmp -s "$f" "$QB/pc-bios/${f##*/}" || install -m 0644 "$f" "$QB/pc-bios/${f##*/}"
done

# A QEMU 7.2 binary run from its build tree finds data through qemu-bundle/
# (util/cutils.c get_relocated_path): each firmware path directory D is looked
# up as qemu-build/qemu-bundle/D.  Link the system's firmware directories
# there, and give the first one links to our option ROMs, so that the binary
# runs with no -L.  (pc-bios/ keeps copies for an explicit -L pc-bios.)
BUNDLE=$QB/qemu-bundle
IFS=: read -r -a fwdirs <<<"$FIRMWARE_PATH"
romdir=$BUNDLE${fwdirs[0]}
if [[ -L $romdir ]]; then rm -f "$romdir"; fi
mkdir -p "$romdir"
for f in "$QB"/pc-bios/*.bin; do
    target=$(realpath --relative-to="$romdir" "$f")
    [[ $(readlink "$romdir/${f##*/}" 2>/dev/null) == "$target" ]] || ln -sfn "$target" "$romdir/${f##*/}"
done
for d in "${fwdirs[@]:1}"; do
    [[ -d $d ]] || continue
    if [[ $(readlink "$BUNDLE$d" 2>/dev/null) != "$d" ]]; then
        mkdir -p "$(dirname "$BUNDLE$d")"
        rm -rf "$BUNDLE$d"
        ln -s "$d" "$BUNDLE$d"
    fi
done

[[ $(readlink "$BUILD/qemu-system-x86_64" 2>/dev/null) == qemu-build/qemu-system-x86_64 ]] \
    || ln -sfn qemu-build/qemu-system-x86_64 "$BUILD/qemu-system-x86_64"
