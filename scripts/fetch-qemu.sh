#!/bin/bash
# Obtain Debian's QEMU 10.0 source package (trixie's qemu 1:10.0.*) and unpack
# it into build/qemu-src; obtain the build tools Debian 12 lacks from
# bookworm-backports into build/tools/ (unpacked with dpkg-deb -x, never
# installed into the system):
#   build/tools/meson/    meson >= 1.5 (QEMU 10.0's configure wants it); its
#                         modules are in usr/lib/python3/dist-packages
#   build/tools/seabios/  seabios >> 1.16.3-1~ (what Debian's qemu-system-x86
#                         10.0 depends on), firmware in usr/share/seabios
#
# The system's apt configuration is left alone: a private sources.list under
# build/apt/ is derived from the system's enabled bookworm entries (mirror
# URIs and Signed-By): deb-src lines for trixie, trixie-updates and, when the
# system has bookworm-security, trixie-security from the security mirror;
# deb and deb-src lines for bookworm-backports.  apt runs with its own lists
# and cache directories there.
#
#   scripts/fetch-qemu.sh                  fetch (if needed) the tools and the
#                                          source, unpack into build/qemu-src
#   scripts/fetch-qemu.sh --tools          the tools only
#   scripts/fetch-qemu.sh --extract-to DIR unpack the version recorded in build/qemu-src
#                                          into the fresh directory DIR (pristine copy)
#
# Skips everything when build/qemu-src and build/tools/* carry stamps with
# acceptable versions, so a second run needs no network.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${BUILD:-$ROOT/build}
SRC=$BUILD/qemu-src
DL=$BUILD/dl
APTDIR=$BUILD/apt
TOOLS=$BUILD/tools
STAMP=.mem-share-version
# QEMU 10.0 as Debian 13 ships it (stable, point and security updates); the
# newest version the archive serves completely is taken.
VERSION_GLOB=${QEMU_DEB_VERSION_GLOB:-'1:10.0.*'}
# Tools from bookworm-backports: directory under build/tools, package, and the
# version constraint (a dpkg --compare-versions operator and version).
TOOL_SPECS=(
    "meson meson ge 1.5"
    "seabios seabios gt 1.16.3-1~"
)

log() { echo "fetch-qemu: $*"; }
die() { echo "fetch-qemu: error: $*" >&2; exit 1; }

# Debian version without epoch, as used in file names.
noepoch() { echo "${1#*:}"; }

# apt_opts, write_sources, apt_update, sort_versions, source_versions: the private apt
# configuration in $APTDIR (shared with scripts/fetch-libvirt.sh).
# shellcheck source=scripts/apt-private.sh
. scripts/apt-private.sh

# fetch_source VERSION: download qemu=VERSION into $DL.  Files reach $DL only
# when apt fetched (and checked) all of them; the .dsc is moved last, so a .dsc
# in $DL means a complete download.  Returns 1 if the archive does not serve
# all files (an old version's .dsc may be gone from the mirror).
fetch_source() {
    local version=$1 tmp f
    [[ -f $DL/qemu_$(noepoch "$version").dsc ]] && return 0
    mkdir -p "$DL"
    tmp=$DL/.partial.$$
    rm -rf "$tmp" && mkdir -p "$tmp"
    log "downloading qemu=$version"
    if ! (cd "$tmp" && apt-get "${apt_opts[@]}" -qq source --download-only "qemu=$version") \
            </dev/null >"$APTDIR/source.log" 2>&1 || [[ ! -f $tmp/qemu_$(noepoch "$version").dsc ]]; then
        log "qemu=$version is not complete in the archive:" >&2
        grep -E '^(E|W):' "$APTDIR/source.log" | head -5 | sed 's/^/fetch-qemu:   /' >&2 || true
        rm -rf "$tmp"
        return 1
    fi
    for f in "$tmp"/*; do
        [[ $f == *.dsc ]] || mv -f "$f" "$DL/"
    done
    mv -f "$tmp"/*.dsc "$DL/"
    rm -rf "$tmp"
}

# download [VERSION]: fetch VERSION, or the newest matching version the
# archive serves completely; records the version in $APTDIR/picked.
download() {
    local version=${1:-} v tried=()
    mkdir -p "$APTDIR"
    if [[ -n $version ]]; then
        if [[ ! -f $DL/qemu_$(noepoch "$version").dsc ]]; then
            apt_update
            fetch_source "$version" || die "qemu=$version cannot be downloaded (see ${APTDIR#$ROOT/}/source.log)"
        fi
        echo "$version" >"$APTDIR/picked"
        return 0
    fi
    apt_update
    while read -r v; do
        tried+=("$v")
        if fetch_source "$v"; then
            echo "$v" >"$APTDIR/picked"
            return 0
        fi
        log "trying the next version"
    done < <(source_versions qemu "$VERSION_GLOB")
    if ((${#tried[@]})); then
        die "no qemu source version matching '$VERSION_GLOB' downloads completely (tried: ${tried[*]})"
    fi
    die "no qemu source version matching '$VERSION_GLOB' in: $(grep -v '^#' "$APTDIR/sources.list" | grep '^deb-src' | tr '\n' ';')"
}

# ---------------------------------------------------------------------------
# Tools from bookworm-backports

# tool_ok DIR OP MIN: the unpacked tool in DIR carries a stamp with a version
# that satisfies the constraint.
tool_ok() {
    local dir=$1 op=$2 min=$3 pkg ver
    [[ -f $dir/$STAMP ]] || return 1
    read -r pkg ver <"$dir/$STAMP" || return 1
    [[ -n $ver ]] && dpkg --compare-versions "$ver" "$op" "$min"
}

# check_tool NAME DIR: the unpacked files are usable.
check_tool() {
    local name=$1 dir=$2 v
    case $name in
    meson)
        v=$(PYTHONPATH=$dir/usr/lib/python3/dist-packages /usr/bin/python3 -c \
            'import mesonbuild.coredata as c; print(c.version)' 2>/dev/null) \
            || { echo "mesonbuild does not import from $dir"; return 1; }
        dpkg --compare-versions "$v" ge 1.5 || { echo "meson $v < 1.5"; return 1; }
        [[ $(PYTHONPATH=$dir/usr/lib/python3/dist-packages /usr/bin/python3 -c \
            'import mesonbuild, os; print(os.path.dirname(os.path.dirname(mesonbuild.__file__)))') \
            == "$dir/usr/lib/python3/dist-packages" ]] || { echo "another mesonbuild shadows $dir"; return 1; }
        ;;
    seabios)
        for v in bios-256k.bin bios.bin vgabios-stdvga.bin; do
            [[ -s $dir/usr/share/seabios/$v ]] || { echo "no usr/share/seabios/$v"; return 1; }
        done
        ;;
    esac
}

# fetch_tool NAME PACKAGE OP MIN
fetch_tool() {
    local name=$1 pkg=$2 op=$3 min=$4 dir=$TOOLS/$1 v version="" deb tmp why
    tool_ok "$dir" "$op" "$min" && return 0
    apt_update
    while read -r v; do
        if dpkg --compare-versions "$v" "$op" "$min"; then version=$v; break; fi
    done < <(apt-cache "${apt_opts[@]}" madison "$pkg" 2>/dev/null | awk -F' [|] ' '$3 ~ / Packages$/ { print $2 }' | sort_versions)
    if [[ -z $version ]]; then
        case $op in ge) op=">=" ;; gt) op=">>" ;; esac
        die "no $pkg ($op $min) in bookworm-backports (binary versions there: $(apt-cache "${apt_opts[@]}" madison "$pkg" 2>/dev/null | awk -F' [|] ' '$3 ~ / Packages$/ { print $2 }' | sort -u | tr '\n' ' '))"
    fi
    mkdir -p "$DL"
    deb=$(compgen -G "$DL/${pkg}_$(noepoch "$version")_*.deb" | head -1 || true)
    if [[ -z $deb ]]; then
        log "downloading $pkg=$version"
        tmp=$DL/.partial.$$
        rm -rf "$tmp" && mkdir -p "$tmp"
        (cd "$tmp" && apt-get "${apt_opts[@]}" -qq download "$pkg=$version" </dev/null) >"$APTDIR/download.log" 2>&1 \
            || { cat "$APTDIR/download.log" >&2; rm -rf "$tmp"; die "apt-get download $pkg=$version failed"; }
        deb=$(compgen -G "$tmp/${pkg}_*.deb" | head -1 || true)
        [[ -n $deb ]] || { rm -rf "$tmp"; die "apt-get download $pkg=$version left no .deb"; }
        mv -f "$deb" "$DL/" && deb=$DL/${deb##*/}
        rm -rf "$tmp"
    fi
    [[ $(dpkg-deb -f "$deb" Package) == "$pkg" && $(dpkg-deb -f "$deb" Version) == "$version" ]] \
        || die "$deb is not $pkg $version"
    tmp=$dir.tmp.$$
    rm -rf "$tmp" && mkdir -p "$tmp"
    dpkg-deb -x "$deb" "$tmp" || { rm -rf "$tmp"; die "dpkg-deb -x $deb failed"; }
    why=$(check_tool "$name" "$tmp") || { rm -rf "$tmp"; die "$pkg $version from $deb: $why"; }
    echo "$pkg $version" >"$tmp/$STAMP"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    log "$pkg $version unpacked into ${dir#$ROOT/}"
}

fetch_tools() {
    local spec
    for spec in "${TOOL_SPECS[@]}"; do
        # shellcheck disable=SC2086
        fetch_tool $spec
    done
}

# extract VERSION DEST: unpack into the fresh directory DEST and verify it.
extract() {
    local version=$1 dest=$2 tmp
    local dsc=$DL/qemu_$(noepoch "$version").dsc
    [[ -f $dsc ]] || download "$version"
    tmp=$dest.tmp.$$
    rm -rf "$tmp"
    mkdir -p "$(dirname "$dest")"
    dpkg-source --no-copy -x "$dsc" "$tmp" >"$BUILD/dpkg-source.log" 2>&1 \
        || { cat "$BUILD/dpkg-source.log" >&2; rm -rf "$tmp"; die "dpkg-source -x $dsc failed"; }
    local got
    got=$(head -1 "$tmp/debian/changelog" | sed -n 's/^qemu (\([^)]*\)).*/\1/p')
    [[ $got == "$version" ]] || { rm -rf "$tmp"; die "unpacked version '$got' is not '$version'"; }
    echo "$version" >"$tmp/$STAMP"
    rm -rf "$dest"
    mv "$tmp" "$dest"
}

stamped_version() {
    local v
    [[ -f $SRC/$STAMP ]] || return 1
    v=$(cat "$SRC/$STAMP")
    # shellcheck disable=SC2053
    [[ $v == $VERSION_GLOB ]] || return 1
    echo "$v"
}

case ${1:-} in
--extract-to)
    [[ -n ${2:-} ]] || die "usage: $0 --extract-to DIR"
    version=$(stamped_version) || die "no stamped source in $SRC; run $0 first"
    extract "$version" "$2"
    exit 0
    ;;
--tools)
    mkdir -p "$BUILD"
    fetch_tools
    exit 0
    ;;
"") ;;
*) die "usage: $0 [--tools | --extract-to DIR]" ;;
esac

mkdir -p "$BUILD"
fetch_tools
if version=$(stamped_version); then
    exit 0
fi

rm -f "$APTDIR/picked"
download ""
version=$(cat "$APTDIR/picked")
log "unpacking qemu $version into ${SRC#$ROOT/}"
extract "$version" "$SRC"
