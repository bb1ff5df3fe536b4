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

apt_opts=(
    -o "Dir::Etc::SourceList=$APTDIR/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$APTDIR/lists"
    -o "Dir::Cache=$APTDIR/cache"
    -o "APT::Sandbox::User=root"
)

write_sources() {
    mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial"
    /usr/bin/python3 - "$APTDIR/sources.list" <<'PY'
import glob, os, re, sys

# The system's bookworm suite -> what the private configuration gets from the
# same mirror (the security mirror serves trixie-security).
MAP = {
    "bookworm": [("deb-src", "trixie"), ("deb", "bookworm-backports"),
                 ("deb-src", "bookworm-backports")],
    "bookworm-updates": [("deb-src", "trixie-updates")],
    "bookworm-security": [("deb-src", "trixie-security")],
}
out = []

def add(options, uri, suite, comps):
    # qemu, meson and seabios are all in main.
    if suite not in MAP or "main" not in comps:
        return
    opts = " ".join(f"{k}={v}" for k, v in options if k.lower() not in ("arch", "architectures"))
    for kind, new_suite in MAP[suite]:
        line = f"{kind} " + (f"[ {opts} ] " if opts else "") + f"{uri} {new_suite} main"
        if line not in out:
            out.append(line)

def one_line(path):
    for raw in open(path, encoding="utf-8", errors="replace"):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^(\S+)\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)$", line)
        if not m or m.group(1) != "deb":
            continue
        options = []
        for o in (m.group(2) or "").split():
            if "=" in o:
                k, v = o.split("=", 1)
                options.append((k.rstrip("+-"), v))
        add(options, m.group(3), m.group(4), m.group(5).split())

def deb822(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    for stanza in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key:
                fields[key] += " " + raw.strip()
                continue
            if ":" in raw:
                key, val = raw.split(":", 1)
                key = key.strip().lower()
                fields[key] = val.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        options = []
        if "signed-by" in fields and "\n" not in fields["signed-by"] and "BEGIN PGP" not in fields["signed-by"]:
            options.append(("signed-by", fields["signed-by"]))
        for k in ("trusted", "check-valid-until"):
            if k in fields:
                options.append((k, fields[k]))
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                add(options, uri, suite, fields.get("components", "").split())

files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
for f in files:
    if os.path.isfile(f):
        one_line(f)
for f in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    deb822(f)

if not any(" trixie main" in l for l in out):
    sys.exit("no enabled 'deb' entry for bookworm (component main) in the system's apt sources")
with open(sys.argv[1], "w") as fh:
    fh.write("# Generated by scripts/fetch-qemu.sh from the system's apt sources.\n")
    fh.write("\n".join(out) + "\n")
PY
}

UPDATED=""
apt_update() {
    [[ -z $UPDATED ]] || return 0
    write_sources
    log "apt-get update (private lists in ${APTDIR#$ROOT/}/)"
    apt-get "${apt_opts[@]}" -qq update </dev/null >"$APTDIR/update.log" 2>&1 \
        || { cat "$APTDIR/update.log" >&2; die "apt-get update failed"; }
    UPDATED=1
}

# sort_versions: versions on stdin, newest first (dpkg's ordering).
sort_versions() {
    local v sorted=() i n
    while read -r v; do
        [[ -n $v ]] || continue
        n=${#sorted[@]}
        for ((i = 0; i < n; i++)); do
            [[ ${sorted[i]} == "$v" ]] && continue 2
            dpkg --compare-versions "$v" gt "${sorted[i]}" && break
        done
        sorted=("${sorted[@]:0:i}" "$v" "${sorted[@]:i}")
    done
    ((${#sorted[@]} == 0)) || printf '%s\n' "${sorted[@]}"
}

# Source versions matching VERSION_GLOB, newest first.
qemu_versions() {
    local v
    apt-cache "${apt_opts[@]}" showsrc qemu 2>/dev/null | sed -n 's/^Version: //p' |
        while read -r v; do
            # shellcheck disable=SC2053
            [[ $v == $VERSION_GLOB ]] && echo "$v"
        done | sort_versions
}

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
    done < <(qemu_versions)
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
