#!/bin/bash
# Obtain Debian's libvirt 11.3 source package (the newest 11.3.* that trixie,
# its updates and security suites or bookworm-backports serve completely),
# unpack it into build/libvirt-src the way dpkg-source does for a 3.0 (quilt)
# package (orig tarball, debian tarball, debian/patches/series), then apply
# patches/libvirt/series.
#
# apt runs with the private configuration of scripts/apt-private.sh (the same
# build/apt/ as scripts/fetch-qemu.sh; the system's apt sources are left
# alone).  Downloads go to build/dl/.
#
# Why not just `apt-get source`: the archive does not always serve every file
# of a source package.  bookworm-backports' 11.3.0-2~bpo12+1 lacks its .dsc
# and .debian.tar.xz; trixie's 11.3.0-3+deb13u3 lacks its .dsc and the orig
# tarball's upstream signature (.orig.tar.xz.asc), so `apt-get source`
# aborts and dpkg-source -x has nothing to work on.  So: `apt-get source
# --download-only` first; when it fails, the files are fetched one by one
# (`apt-get source --print-uris` for the URIs, apt's own apt-helper, with
# the expected SHA256, to download them).  Required: the orig and debian
# tarballs.  Optional: the .dsc (the index stanza carries what it would say:
# Format and Checksums-Sha256) and the .asc (upstream's signature of the orig
# tarball).
#
# Verification: every file is checked against the SHA256 and size that
# `apt-cache showsrc` gives for that version, i.e. the Sources index, which
# apt accepted only through the suite's InRelease file signed by the Debian
# archive keys.  That is the anchor.  Neither the .dsc's OpenPGP signature (a
# Debian developer's key; debian-keyring is not installed, and the .dsc is
# not even served) nor the upstream .asc is checked.  Once verified, the
# index's list is kept as build/dl/libvirt_VERSION.sha256 (written last: its
# presence means a complete, verified download) and the unpack checks the
# files against it again.
#
#   scripts/fetch-libvirt.sh    fetch (if needed) and unpack into build/libvirt-src
#
# Skips everything when build/libvirt-src carries a stamp with an acceptable
# version and the current patch series, so a second run needs no network (a
# changed patch series re-unpacks from build/dl/, also without network).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${BUILD:-$ROOT/build}
SRC=$BUILD/libvirt-src
DL=$BUILD/dl
APTDIR=$BUILD/apt
STAMP=.mem-share-version
PATCHDIR=patches/libvirt
SERIES=$PATCHDIR/series
VERSION_GLOB=${LIBVIRT_DEB_VERSION_GLOB:-'11.3.*'}
PKG=libvirt

log() { echo "fetch-libvirt: $*"; }
die() { echo "fetch-libvirt: error: $*" >&2; exit 1; }

# apt_opts, write_sources, apt_update, sort_versions, source_versions
# shellcheck source=scripts/apt-private.sh
. scripts/apt-private.sh

# Patch file names from our series: one per line, '#' comments and blank lines ignored.
series_patches() {
    [[ -f $SERIES ]] || return 0
    sed -e 's/#.*//' "$SERIES" | awk 'NF { print $1 }'
}

# What the stamp holds: the Debian version and a hash of our patch series.
stamp_for() {
    local version=$1 p
    echo "$version"
    {
        for p in $(series_patches); do
            echo "patch $p"
            sha256sum <"$PATCHDIR/$p"
        done
    } | sha256sum | cut -d' ' -f1
}

# checksums VERSION: "sha256 size name" lines from the (Release-signed)
# Sources index's Checksums-Sha256 of PKG=VERSION.
checksums() {
    apt-cache "${apt_opts[@]}" showsrc "$PKG" 2>/dev/null | /usr/bin/python3 -c '
import sys
version = sys.argv[1]
seen = set()
for stanza in sys.stdin.read().split("\n\n"):
    fields, key = {}, None
    for line in stanza.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, val = line.split(":", 1)
            fields[key] = val.strip()
    if fields.get("Package") != "'"$PKG"'" or fields.get("Version") != version:
        continue
    for l in fields.get("Checksums-Sha256", "").split("\n"):
        if l.strip() and l not in seen:
            seen.add(l)
            print(l.strip())
' "$1"
}

# needed_files VERSION: the files the unpack needs (no .dsc, no .asc).
needed_files() {
    checksums "$1" | awk '$3 !~ /\.(asc|dsc)$/ { print $3 }'
}

# verify VERSION DIR: the needed files of VERSION are in DIR and match the
# index (so does an optional file that is present).
verify() {
    local version=$1 dir=$2 sum size name got
    while read -r sum size name; do
        [[ -n $name ]] || continue
        if [[ ! -f $dir/$name ]]; then
            [[ $name == *.asc || $name == *.dsc ]] && continue
            echo "missing $name"
            return 1
        fi
        got=$(sha256sum <"$dir/$name" | cut -d' ' -f1)
        [[ $got == "$sum" && $(stat -c %s "$dir/$name") == "$size" ]] \
            || { echo "$name: sha256 $got, the index says $sum ($size bytes)"; return 1; }
    done < <(checksums "$version")
}

manifest_name() { echo "${PKG}_${1#*:}.sha256"; }

# index_format VERSION: the Format field of PKG=VERSION in the index.
index_format() {
    apt-cache "${apt_opts[@]}" showsrc "$PKG" 2>/dev/null | awk -v v="$1" '
        /^$/ { ver = "" } /^Version: / { ver = $2 }
        /^Format: / && ver == "" { fmt = substr($0, 9) }
        /^Format: / && ver != "" && ver == v { print substr($0, 9); exit }
        /^Version: / && ver == v && fmt != "" { print fmt; exit }
        /^$/ { fmt = "" }'
}

# fetch_source VERSION: download PKG=VERSION into $DL, verified; the manifest
# (build/dl/libvirt_VERSION.sha256) is written last.  Returns 1 when the
# archive does not serve the needed files.
fetch_source() {
    local version=$1 tmp f uri name size hash why format
    [[ -f $DL/$(manifest_name "$version") ]] && return 0
    [[ -n $(checksums "$version") ]] || { log "$PKG=$version: no Checksums-Sha256 in the index"; return 1; }
    format=$(index_format "$version")
    [[ $format == "3.0 (quilt)" ]] || { log "$PKG=$version: format '$format', not 3.0 (quilt)"; return 1; }
    mkdir -p "$DL"
    tmp=$DL/.partial.$$
    rm -rf "$tmp" && mkdir -p "$tmp"
    log "downloading $PKG=$version"
    if ! (cd "$tmp" && apt-get "${apt_opts[@]}" -qq source --download-only "$PKG=$version") \
            </dev/null >"$APTDIR/libvirt-source.log" 2>&1; then
        # File by file (apt-get source may have left some, checked by it).
        log "apt-get source failed; fetching the files one by one"
        grep -E '^(E|W):' "$APTDIR/libvirt-source.log" | grep -v 'Failed to fetch some' | head -3 \
            | sed 's/^/fetch-libvirt:   /' || true
        (cd "$tmp" && apt-get "${apt_opts[@]}" -qq source --print-uris "$PKG=$version") \
            </dev/null >"$APTDIR/libvirt-uris.log" 2>&1 \
            || { cat "$APTDIR/libvirt-uris.log" >&2; rm -rf "$tmp"; return 1; }
        while read -r uri name size hash; do
            uri=${uri//\'/}
            [[ $uri == *://* && -n $name ]] || continue
            [[ -f $tmp/$name ]] && continue
            [[ $hash == *:* ]] || hash=""
            if ! /usr/lib/apt/apt-helper "${apt_opts[@]}" download-file "$uri" "$tmp/$name" ${hash:+"$hash"} \
                    </dev/null >>"$APTDIR/libvirt-source.log" 2>&1; then
                rm -f "$tmp/$name"
                case $name in
                *.asc) log "  $name is not served (optional: upstream's signature of the orig tarball)" ;;
                *.dsc) log "  $name is not served (optional: the index has its Format and checksums)" ;;
                *) log "  $name is not served"; rm -rf "$tmp"; return 1 ;;
                esac
            fi
        done <"$APTDIR/libvirt-uris.log"
    fi
    why=$(verify "$version" "$tmp") || { log "$PKG=$version: $why"; rm -rf "$tmp"; return 1; }
    for f in "$tmp"/*; do
        [[ -f $f ]] && mv -f "$f" "$DL/"
    done
    rm -rf "$tmp"
    { echo "Format: $format"; checksums "$version"; } >"$DL/$(manifest_name "$version").tmp"
    mv -f "$DL/$(manifest_name "$version").tmp" "$DL/$(manifest_name "$version")"
}

# download: the newest matching version the archive serves completely;
# prints it.
download() {
    local v tried=()
    mkdir -p "$APTDIR"
    apt_update >&2
    while read -r v; do
        tried+=("$v")
        if fetch_source "$v" >&2; then
            echo "$v"
            return 0
        fi
        log "trying the next version" >&2
    done < <(source_versions "$PKG" "$VERSION_GLOB")
    ((${#tried[@]})) && die "no $PKG source version matching '$VERSION_GLOB' downloads completely (tried: ${tried[*]})"
    die "no $PKG source version matching '$VERSION_GLOB' in: $(grep '^deb-src' "$APTDIR/sources.list" | tr '\n' ';')"
}

# A version already downloaded completely (its manifest in $DL), newest
# first: re-unpacking after a patch series change needs no network.
downloaded_version() {
    local f v
    for f in "$DL/${PKG}"_*.sha256; do
        [[ -f $f ]] || continue
        v=${f##*/"${PKG}"_}
        v=${v%.sha256}
        # shellcheck disable=SC2053
        [[ $v == $VERSION_GLOB ]] && echo "$v"
    done | sort_versions | head -1
}

# extract VERSION DEST: unpack like dpkg-source -x (3.0 (quilt)) into the
# fresh directory DEST, apply our series.
extract() {
    local version=$1 dest=$2 tmp sum size name orig="" debian="" line p opt
    local manifest
    manifest=$DL/$(manifest_name "$version")
    # The files (checked against the index at download) must still match.
    grep -qx 'Format: 3.0 (quilt)' "$manifest" || die "${manifest#$ROOT/}: not 3.0 (quilt)"
    while read -r sum size name; do
        [[ $sum != Format: ]] || continue
        case $name in
        *.asc | *.dsc) continue ;;
        *.orig.tar.*) orig=$DL/$name ;;
        *.debian.tar.*) debian=$DL/$name ;;
        *) die "unexpected file $name in ${manifest#$ROOT/} (an orig-COMPONENT tarball?)" ;;
        esac
        [[ -f $DL/$name && $(sha256sum <"$DL/$name" | cut -d' ' -f1) == "$sum" ]] \
            || die "$DL/$name is missing or does not match ${manifest#$ROOT/}"
    done <"$manifest"
    [[ -n $orig && -n $debian ]] || die "${manifest#$ROOT/} lists no orig or debian tarball"

    tmp=$dest.tmp.$$
    rm -rf "$tmp" && mkdir -p "$tmp"
    tar -C "$tmp" --strip-components=1 -xf "$orig" || { rm -rf "$tmp"; die "unpacking $orig failed"; }
    rm -rf "$tmp/debian"
    tar -C "$tmp" -xf "$debian" || { rm -rf "$tmp"; die "unpacking $debian failed"; }
    # debian/patches/series: quilt's, patch name and optional -pN per line.
    if [[ -f $tmp/debian/patches/series ]]; then
        while read -r line; do
            line=${line%%#*}
            read -r p opt <<<"$line" || true
            [[ -n $p ]] || continue
            patch -d "$tmp" ${opt:--p1} --no-backup-if-mismatch --batch -f -s -i "debian/patches/$p" \
                >"$BUILD/libvirt-patch.log" 2>&1 \
                || { cat "$BUILD/libvirt-patch.log" >&2; rm -rf "$tmp"; die "debian/patches/$p failed to apply"; }
        done <"$tmp/debian/patches/series"
    fi
    for p in $(series_patches); do
        [[ -f $PATCHDIR/$p ]] || { rm -rf "$tmp"; die "patch '$p' listed in $SERIES does not exist"; }
        patch -d "$tmp" -p1 --no-backup-if-mismatch --batch -f -s -i "$ROOT/$PATCHDIR/$p" \
            >"$BUILD/libvirt-patch.log" 2>&1 \
            || { cat "$BUILD/libvirt-patch.log" >&2; mv "$tmp" "$dest.failed"; die "$PATCHDIR/$p failed to apply (tree left in ${dest#$ROOT/}.failed)"; }
    done
    local got
    got=$(head -1 "$tmp/debian/changelog" | sed -n 's/^libvirt (\([^)]*\)).*/\1/p')
    [[ $got == "$version" ]] || { rm -rf "$tmp"; die "unpacked version '$got' is not '$version'"; }
    stamp_for "$version" >"$tmp/$STAMP"
    rm -rf "$dest"
    mv "$tmp" "$dest"
}

case ${1:-} in
"") ;;
*) die "usage: $0" ;;
esac

mkdir -p "$BUILD"
if [[ -f $SRC/$STAMP ]]; then
    v=$(head -1 "$SRC/$STAMP")
    # shellcheck disable=SC2053
    if [[ $v == $VERSION_GLOB && $(cat "$SRC/$STAMP") == "$(stamp_for "$v")" ]]; then
        exit 0
    fi
fi

version=$(downloaded_version)
[[ -n $version ]] || version=$(download)
log "unpacking $PKG $version into ${SRC#$ROOT/}"
extract "$version" "$SRC"
log "$(series_patches | wc -l) patches of $SERIES applied"
