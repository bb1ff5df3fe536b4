#!/bin/bash
# Configure (when needed) and build QEMU 10.0 in build/qemu-build from
# build/qemu-src, build the x86 option ROMs and lay out the firmware so that
# build/qemu-system-x86_64 runs with no -L.
#
# configure runs once; again only when its flags, the meson from build/tools
# or the patch series change (the stamp build/stamps/configure holds all
# three).  ninja decides what to rebuild, so running this with nothing
# changed does no work.
#
#   scripts/build-qemu.sh            configure and build
#   scripts/build-qemu.sh --dry-run  configure, option ROMs, firmware, and
#                                    `ninja -n` instead of the compile
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${BUILD:-$ROOT/build}
SRC=$BUILD/qemu-src
QB=$BUILD/qemu-build
STAMPS=$BUILD/stamps
TOOLS=$BUILD/tools
DRY_RUN=""
case ${1:-} in
--dry-run) DRY_RUN=1 ;;
"") ;;
*) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

# The system's python (the pyenv python3 on PATH must not be used), with
# meson >= 1.5 from bookworm-backports (scripts/fetch-qemu.sh unpacks it into
# build/tools/meson) ahead of Debian 12's meson 1.0: QEMU's configure puts
# that meson into its venv (qemu-build/pyvenv), and ninja's regeneration runs
# it from there (see the .pth file below).
export PATH=/usr/bin:/bin:$PATH
MESON_PY=$TOOLS/meson/usr/lib/python3/dist-packages
export PYTHONPATH=$MESON_PY${PYTHONPATH:+:$PYTHONPATH}
SEABIOS=$TOOLS/seabios/usr/share/seabios

# Debian's firmware path.  A binary run from its build tree looks each
# directory D up as qemu-build/qemu-bundle/D (util/cutils.c
# get_relocated_path), and only there; see the firmware layout below.
FIRMWARE_PATH=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu

CONFIGURE_FLAGS=(
    --target-list=x86_64-softmmu
    --enable-kvm
    --enable-tcg
    --disable-docs
    --enable-slirp
    --enable-linux-aio
    --enable-linux-io-uring
    --enable-numa
    --disable-install-blobs
    --disable-download
    --disable-containers
    "--firmwarepath=$FIRMWARE_PATH"
)
# Targets built; all required.  mem-share-test comes with the patch series
# (QEMU 10.0 silently drops a qtest whose meson conditions are false, so its
# absence is an error here, not a skip).
TARGETS=(
    qemu-system-x86_64
    qemu-img
    tests/qtest/qom-test
    tests/qtest/qmp-cmd-test
    tests/qtest/test-hmp
    tests/qtest/device-introspect-test
    tests/qtest/mem-share-test
)
# QEMU 10.0's pc-bios/optionrom/Makefile builds these.
OPTION_ROMS=(multiboot.bin multiboot_dma.bin linuxboot.bin linuxboot_dma.bin kvmvapic.bin pvh.bin)

log() { echo "build-qemu: $*"; }
die() { echo "build-qemu: error: $*" >&2; exit 1; }

[[ -f $SRC/.mem-share-overlay/patches.hash ]] || die "source tree not prepared; run scripts/overlay.sh"
scripts/fetch-qemu.sh --tools
mkdir -p "$STAMPS" "$QB"

# A build directory configured for another QEMU (7.2, say) starts afresh.
info=$QB/meson-info/intro-projectinfo.json
if [[ -f $info ]]; then
    built=$(/usr/bin/python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' "$info" 2>/dev/null || true)
    if [[ $built != "$(cat "$SRC/VERSION")" ]]; then
        log "${QB#$ROOT/} holds a build of QEMU ${built:-?}, not $(cat "$SRC/VERSION"): removing it"
        rm -rf "$QB" "$STAMPS/configure"
        mkdir -p "$QB"
    fi
fi

meson_version=$(/usr/bin/python3 -c 'import mesonbuild.coredata as c; print(c.version)')
want_stamp=$(printf '%s\n' "${CONFIGURE_FLAGS[@]}" "meson $meson_version" \
    "patches $(cat "$SRC/.mem-share-overlay/patches.hash")")
if [[ ! -f $QB/build.ninja || ! -f $STAMPS/configure || $(cat "$STAMPS/configure") != "$want_stamp" ]]; then
    log "configure (meson $meson_version; log: ${QB#$ROOT/}/configure.log)"
    rm -f "$STAMPS/configure"
    if ! (cd "$QB" && "$SRC/configure" "${CONFIGURE_FLAGS[@]}") >"$QB/configure.log" 2>&1 </dev/null; then
        tail -40 "$QB/configure.log" >&2
        die "configure failed"
    fi
    echo "$want_stamp" >"$STAMPS/configure"
fi

# The venv's meson script imports mesonbuild through sys.path: a .pth file in
# the venv (read before the system's dist-packages) makes it the meson of
# build/tools even when ninja runs without PYTHONPATH (by hand, say).
pth=$(compgen -G "$QB/pyvenv/lib/python3*/site-packages" | head -1 || true)
[[ -n $pth ]] || die "configure left no venv in ${QB#$ROOT/}/pyvenv"
pth=$pth/mem-share-meson.pth
[[ $(cat "$pth" 2>/dev/null) == "$MESON_PY" ]] || echo "$MESON_PY" >"$pth"

# Let meson regenerate build.ninja first if an overlaid meson.build changed,
# so that the target list below is current.
if ! out=$(ninja -C "$QB" build.ninja 2>&1); then
    echo "$out" >&2
    die "meson could not regenerate build.ninja"
fi

known=$(ninja -C "$QB" -t targets all 2>/dev/null | sed 's/:.*//')
missing=()
for t in "${TARGETS[@]}"; do
    grep -qxF "$t" <<<"$known" || missing+=("$t")
done
((${#missing[@]} == 0)) || die "no ninja target ${missing[*]} in ${QB#$ROOT/}: does the patch series wire it into meson (and are its meson conditions met? see ${QB#$ROOT/}/meson-logs/meson-log.txt)"

# x86 option ROMs (for -kernel, multiboot, PVH, kvmvapic): Debian's dfsg
# source ships no binaries.  QEMU's configure sets pc-bios/optionrom up only
# when `cc -m32` can link -lgcc (gcc-multilib), and only QEMU's top-level make
# builds it, not ninja; the ROMs need neither (-m16, -nostdlib).  So QEMU
# 10.0's own pc-bios/optionrom/Makefile runs here with a config.mak of ours,
# with the system's gcc, in qemu-build/mem-share-optionrom/.
OPTROM=$QB/mem-share-optionrom
mkdir -p "$OPTROM"
[[ $(readlink "$OPTROM/Makefile" 2>/dev/null) == "$SRC/pc-bios/optionrom/Makefile" ]] \
    || ln -sfn "$SRC/pc-bios/optionrom/Makefile" "$OPTROM/Makefile"
config=$(printf '%s\n' "# Written by scripts/build-qemu.sh" "TOPSRC_DIR=$SRC" \
    CC=cc CCAS=cc LD=ld OBJCOPY=objcopy PYTHON=/usr/bin/python3)
[[ $(cat "$OPTROM/config.mak" 2>/dev/null) == "$config" ]] || echo "$config" >"$OPTROM/config.mak"
if ! out=$(env -u ELF_PACKAGE_METADATA make -C "$OPTROM" all 2>&1); then
    echo "$out" >&2
    die "building the option ROMs failed"
fi
mkdir -p "$QB/pc-bios"
for f in "${OPTION_ROMS[@]}"; do
    [[ -s $OPTROM/$f ]] || die "option ROM $f was not built"
    # Copies in pc-bios/ as well, for an explicit -L qemu-build/pc-bios.
    cmp -s "$OPTROM/$f" "$QB/pc-bios/$f" || install -m 0644 "$OPTROM/$f" "$QB/pc-bios/$f"
done

# Firmware layout.  QEMU 10.0 run from its build tree (qemu-bundle/ exists
# next to the binary) finds firmware only in qemu-bundle/D for each firmware
# path directory D, then in qemu-bundle/<datadir>; so:
#   qemu-bundle/usr/share/qemu/     links to our option ROMs and to seabios
#                                   1.16.3 from build/tools (bios-256k.bin,
#                                   vgabios-*.bin, ...): searched first
#   qemu-bundle/usr/share/seabios   -> /usr/share/seabios (the system's seabios,
#                                   a fallback only)
#   qemu-bundle/usr/lib/ipxe/qemu   -> /usr/lib/ipxe/qemu (efi-*.rom, pxe-*.rom)
# meson's own links (qemu-bundle/usr/local/...) are left alone.
BUNDLE=$QB/qemu-bundle
IFS=: read -r -a fwdirs <<<"$FIRMWARE_PATH"
romdir=$BUNDLE${fwdirs[0]}
if [[ -L $romdir ]]; then rm -f "$romdir"; fi
mkdir -p "$romdir"
declare -A want=()
for f in "$SEABIOS"/*; do
    [[ -f $f ]] && want[${f##*/}]=$f
done
[[ -n ${want[bios-256k.bin]:-} ]] || die "no seabios in ${SEABIOS#$ROOT/}"
for f in "${OPTION_ROMS[@]}"; do
    want[$f]=$QB/pc-bios/$f
done
for name in "${!want[@]}"; do
    target=$(realpath --relative-to="$romdir" "${want[$name]}")
    [[ $(readlink "$romdir/$name" 2>/dev/null) == "$target" ]] || ln -sfn "$target" "$romdir/$name"
done
for f in "$romdir"/*; do
    if [[ -L $f && -z ${want[${f##*/}]:-} ]]; then rm -f "$f"; fi
done
for d in "${fwdirs[@]:1}"; do
    [[ -d $d ]] || continue
    if [[ $(readlink "$BUNDLE$d" 2>/dev/null) != "$d" ]]; then
        mkdir -p "$(dirname "$BUNDLE$d")"
        rm -rf "$BUNDLE$d"
        ln -s "$d" "$BUNDLE$d"
    fi
done

# Check the layout the way qemu_find_file() searches it (the firmware path,
# then the data directory, each inside qemu-bundle/): the files -M pc and
# -M q35 load by default, -kernel's ROMs, and KVM's vapic ROM.
datadir=$(sed -n 's/^#define CONFIG_QEMU_DATADIR "\(.*\)"$/\1/p' "$QB/config-host.h")
for name in bios-256k.bin vgabios-stdvga.bin efi-e1000.rom efi-e1000e.rom efi-virtio.rom "${OPTION_ROMS[@]}"; do
    found=""
    for d in "${fwdirs[@]}" "$datadir"; do
        if [[ -r $BUNDLE$d/$name ]]; then found=$BUNDLE$d/$name; break; fi
    done
    [[ -n $found ]] || die "firmware $name is not found through ${BUNDLE#$ROOT/} (firmware path $FIRMWARE_PATH)"
    case $name in
    bios-256k.bin | vgabios-stdvga.bin) want_real=$SEABIOS/$name ;;
    *.bin) want_real=$QB/pc-bios/$name ;;
    *) want_real="" ;;
    esac
    [[ -z $want_real || $(realpath "$found") == "$(realpath "$want_real")" ]] \
        || die "firmware $name resolves to $(realpath "$found"), not $want_real"
done

if [[ -n $DRY_RUN ]]; then
    log "dry run: ninja -n ${TARGETS[*]}"
    ninja -C "$QB" -n "${TARGETS[@]}" | tail -3
    exit 0
fi

ninja -C "$QB" ${NINJA_JOBS:+-j "$NINJA_JOBS"} "${TARGETS[@]}"

[[ $(readlink "$BUILD/qemu-system-x86_64" 2>/dev/null) == qemu-build/qemu-system-x86_64 ]] \
    || ln -sfn qemu-build/qemu-system-x86_64 "$BUILD/qemu-system-x86_64"
