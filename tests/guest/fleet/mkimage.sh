#!/bin/bash
# Build the fleet guest's initramfs: a minimal Debian 12 root (what
# debootstrap --variant=minbase installs: the packages of priority
# required) plus python3, sqlite3 and perl, trimmed, with this directory's
# init and services and a manifest of every file.
#
#   tests/guest/fleet/mkimage.sh OUTDIR     (build.sh runs it: make guest)
#
# Produces OUTDIR/fleet.cpio.gz and OUTDIR/fleet.pkg (the package versions
# and inputs it was built from); keeps the .debs in OUTDIR/dl/fleet.
#
# The packages come from the archive the system's apt knows (its package
# lists, read only; the kernel of build/guest comes from the same lists),
# resolved and downloaded by apt-get with a private, empty dpkg status and
# a private cache under OUTDIR/dl/fleet: nothing is installed, the
# system's apt configuration and state are not changed.  They are unpacked
# with dpkg-deb (no maintainer script runs: no chroot, no root needed),
# then the little the image needs of what those scripts do is done here:
# merged /usr, passwd and group from base-passwd, the awk alternative, and
# python's byte-code (compiled by the image's own python3, as py3compile
# would).
#
# Idempotent: nothing is done when the image is newer than its inputs and
# than apt's package lists; apt is asked otherwise, and the image is
# rebuilt only when a package version or an input changed.
set -euo pipefail

OUT=$1
SRC=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
IMG=$OUT/fleet.cpio.gz
STAMP=$OUT/fleet.pkg
DL=$OUT/dl/fleet
INPUTS=("$SRC/mkimage.sh" "$SRC/mkcpio.py" "$SRC/init" "$SRC/fleet.py" "$SRC/fleet.pl")
# What the guest runs besides the minimal base.
EXTRA=(python3 sqlite3 perl)
# Fixed mtime of the files of this directory in the image (reproducible).
EPOCH=1700000000

log() { echo "guest: fleet: $*"; }
die() { echo "guest: fleet: $*" >&2; exit 1; }

newer_input() {
    local f
    for f in "${INPUTS[@]}" /var/lib/apt/lists; do
        [[ $f -nt $1 ]] && return 0
    done
    return 1
}

if [[ -s $IMG && -f $STAMP ]] && ! newer_input "$STAMP"; then
    exit 0
fi

mkdir -p "$DL/state" "$DL/cache/archives/partial"
: >"$DL/state/status"
apt_opts=(
    -o "Dir::State::status=$DL/state/status"
    -o "Dir::State::extended_states=$DL/state/extended_states"
    -o "Dir::Cache=$DL/cache"
    -o "APT::Sandbox::User=root"
    -o "APT::Install-Recommends=false"
    -o "APT::Get::Assume-Yes=true"
    -o "Debug::NoLocking=true"
)

# The packages debootstrap's minbase installs: every package of priority
# required (apt among them), from the lists' candidates.
required() {
    apt-cache "${apt_opts[@]}" dumpavail 2>/dev/null |
        awk '/^Package: /{p=$2} /^Priority: required$/{print p}' | sort -u
}

resolve() {
    # name=version of every package of the root, as apt resolves them.
    # shellcheck disable=SC2046
    apt-get "${apt_opts[@]}" -s install $(required) "${EXTRA[@]}" 2>&1 |
        sed -n 's/^Inst \([^ ]*\) (\([^ ]*\) .*/\1=\2/p' | sort
}

# keep_or_die MESSAGE: an image that exists is kept (with a warning) when
# apt cannot give what a new one needs (no network, say).
keep_or_die() {
    if [[ -s $IMG && -f $STAMP ]]; then
        log "WARNING: $1; keeping $IMG"
        touch "$STAMP"
        exit 0
    fi
    die "$1"
}

pkgs=$(resolve)
if ! grep -q '^python3=' <<<"$pkgs"; then
    log "apt knows no python3 candidate: apt-get update"
    apt-get -qq update || keep_or_die "apt-get update failed"
    pkgs=$(resolve)
    grep -q '^python3=' <<<"$pkgs" ||
        keep_or_die "cannot resolve ${EXTRA[*]} and the required packages with apt"
fi
inputs=$(cat "${INPUTS[@]}" | md5sum | cut -c1-12)
stamp=$(printf 'inputs %s\n%s\n' "$inputs" "$pkgs")
if [[ -s $IMG && -f $STAMP && $(cat "$STAMP") == "$stamp" ]]; then
    touch "$STAMP"
    exit 0
fi

t0=$SECONDS
n=$(wc -l <<<"$pkgs")
log "downloading $n packages (apt-get download only, into ${DL#"$PWD"/})"
download() {
    # shellcheck disable=SC2046
    apt-get "${apt_opts[@]}" -q -d install $(required) "${EXTRA[@]}" >"$DL/download.log" 2>&1
}
if ! download; then
    # Lists older than the archive name versions it no longer serves.
    log "download failed; apt-get update and again"
    if ! apt-get -qq update || ! pkgs=$(resolve) || ! download; then
        cat "$DL/download.log" >&2
        keep_or_die "apt-get could not download the packages"
    fi
    inputs=$(cat "${INPUTS[@]}" | md5sum | cut -c1-12)
    stamp=$(printf 'inputs %s\n%s\n' "$inputs" "$pkgs")
    n=$(wc -l <<<"$pkgs")
fi
# The .debs of the resolved versions (apt names them NAME_VERSION_ARCH.deb,
# with an epoch's colon as %3a); older ones go.
debs=()
declare -A current=()
while IFS='=' read -r p v; do
    set -- "$DL/cache/archives/${p}_${v//:/%3a}_"*.deb
    [[ $# -eq 1 && -f $1 ]] || die "no single .deb of $p $v in $DL/cache/archives"
    debs+=("$1")
    current[$1]=1
done <<<"$pkgs"
for deb in "$DL"/cache/archives/*.deb; do
    [[ -n ${current[$deb]:-} ]] || rm -f "$deb"
done

ROOT=$OUT/fleet-root
rm -rf "$ROOT"
mkdir -p "$ROOT"/usr/{bin,sbin,lib,lib64}
for d in bin sbin lib lib64; do
    ln -s "usr/$d" "$ROOT/$d"
done
log "unpacking (dpkg-deb, no maintainer scripts)"
for deb in "${debs[@]}"; do
    dpkg-deb --fsys-tarfile "$deb" |
        tar -x --keep-directory-symlink --numeric-owner -C "$ROOT" -f -
done

# What the maintainer scripts would have done, as far as the guest needs.
cp "$ROOT/usr/share/base-passwd/passwd.master" "$ROOT/etc/passwd"
cp "$ROOT/usr/share/base-passwd/group.master" "$ROOT/etc/group"
ln -sf ../proc/self/mounts "$ROOT/etc/mtab"
echo ms-fleet >"$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tms-fleet\n' >"$ROOT/etc/hosts"
mkdir -p "$ROOT/etc/alternatives"
for a in awk nawk; do
    ln -sf /usr/bin/mawk "$ROOT/etc/alternatives/$a"
    ln -sf "/etc/alternatives/$a" "$ROOT/usr/bin/$a"
done
mkdir -p "$ROOT"/{proc,sys,dev,run,tmp,data,root}
chmod 1777 "$ROOT/tmp"

# Trimmed: documentation, manual pages, translations, caches, lists.
rm -rf "$ROOT"/usr/share/{doc,man,info,lintian,linda,locale}/* \
    "$ROOT"/var/cache/apt/* "$ROOT"/var/cache/debconf/*-old \
    "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/log/*

# Python's byte-code, as python3's postinst (py3compile) would make it:
# by the image's python3, run through the image's dynamic loader.
pylib=$(cd "$ROOT/usr/lib" && echo python3.[0-9]*)
[[ -d $ROOT/usr/lib/$pylib ]] || die "no usr/lib/python3.* in the image"
log "compiling $pylib"
imgpy() {
    "$ROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
        --library-path "$ROOT/usr/lib/x86_64-linux-gnu" \
        "$ROOT/usr/bin/$pylib" -E -s -S "$@"
}
# sitecustomize.py is a link to /etc/python3.*/: compiled from the image's
# file (compileall would follow the link to the host's).
imgpy -m compileall -q --invalidation-mode timestamp -s "$ROOT" -p / \
    -x '/(test|tests|idle_test)/|/sitecustomize\.py$' "$ROOT/usr/lib/$pylib" \
    >/dev/null || die "compileall failed"
if [[ -L $ROOT/usr/lib/$pylib/sitecustomize.py ]]; then
    imgpy -c 'import importlib.util, py_compile, sys
py_compile.compile(sys.argv[1], cfile=importlib.util.cache_from_source(sys.argv[2]),
                   dfile=sys.argv[3], doraise=True,
                   invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)' \
        "$ROOT/etc/$pylib/sitecustomize.py" "$ROOT/usr/lib/$pylib/sitecustomize.py" \
        "/usr/lib/$pylib/sitecustomize.py" || die "py_compile sitecustomize failed"
fi

# The guest's own files.
mkdir -p "$ROOT/usr/local/lib/ms-fleet" "$ROOT/etc/ms-fleet"
install -m 0755 "$SRC/init" "$ROOT/init"
install -m 0755 "$SRC/fleet.py" "$SRC/fleet.pl" "$ROOT/usr/local/lib/ms-fleet/"
touch -h -d "@$EPOCH" "$ROOT/init" "$ROOT"/usr/local/lib/ms-fleet/*

# The manifest: sha256 of every regular file (sha256sum -c format).
(cd "$ROOT" && find . -type f -print0 | LC_ALL=C sort -z |
    xargs -0 sha256sum) >"$OUT/fleet-manifest.tmp"
mv "$OUT/fleet-manifest.tmp" "$ROOT/etc/ms-fleet/manifest.sha256"
touch -d "@$EPOCH" "$ROOT/etc/ms-fleet/manifest.sha256"
nfiles=$(wc -l <"$ROOT/etc/ms-fleet/manifest.sha256")

log "writing the archive ($nfiles files, $(du -sm "$ROOT" | cut -f1) MiB)"
python3 "$SRC/mkcpio.py" "$ROOT" "$OUT/fleet.cpio.tmp"
gzip -6nf "$OUT/fleet.cpio.tmp"
mv "$OUT/fleet.cpio.tmp.gz" "$IMG"
echo "$stamp" >"$STAMP"
rm -rf "$ROOT"
log "$IMG: $(($(stat -c %s "$IMG") >> 20)) MiB, $nfiles files, built in $((SECONDS - t0)) s"
