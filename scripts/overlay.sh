#!/bin/bash
# Lay the project's files over build/qemu-src and apply patches/qemu/series.
#
#   scripts/overlay.sh               overlay and patch build/qemu-src
#   scripts/overlay.sh --list-files  print the overlay files (the Makefile's
#   scripts/overlay.sh --list-dirs   dependencies: this script holds the list)
#
# Overlay files are copied only when their content differs, so unchanged files
# keep their mtime and ninja rebuilds only what depends on a changed file.
#
# Patches are applied once.  The tree records (in .mem-share-overlay/) a hash
# of the series and every patch; when it changes, or when an overlay file was
# removed, the wanted tree is rebuilt from a fresh unpack of the pristine
# source in build/qemu-src.next and then synced into build/qemu-src, again
# touching only files whose content differs.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${BUILD:-$ROOT/build}
SRC=$BUILD/qemu-src
NEXT=$BUILD/qemu-src.next
STATE_NAME=.mem-share-overlay
STATE=$SRC/$STATE_NAME
PATCHDIR=patches/qemu
SERIES=$PATCHDIR/series
# Overlay directories: they mirror QEMU 10.0's tree (softmmu/ is system/ there).
# The only copy of this list: the Makefile asks for it with --list-files/--list-dirs.
OVERLAY_DIRS=(accel backends hw include migration monitor qapi system tests/qtest docs util)

log() { echo "overlay: $*"; }
die() { echo "overlay: error: $*" >&2; exit 1; }

# Overlay files, relative to the repository, sorted.  Editor and build junk is skipped.
# With the argument d: the directories instead (the Makefile notices a removed file).
overlay_files() {
    local type=${1:-f} dirs=() d
    for d in "${OVERLAY_DIRS[@]}"; do [[ -d $d ]] && dirs+=("$d"); done
    ((${#dirs[@]})) || return 0
    find "${dirs[@]}" \( -name __pycache__ -o -name '.*' \) -prune -o -type "$type" \
        ! -name '*~' ! -name '*.pyc' ! -name '*.orig' ! -name '*.rej' ! -name '*.swp' \
        -print | LC_ALL=C sort
}

case ${1:-} in
--list-files) overlay_files f; exit 0 ;;
--list-dirs) overlay_files d; exit 0 ;;
"") ;;
*) die "usage: $0 [--list-files | --list-dirs]" ;;
esac

[[ -f $SRC/.mem-share-version ]] || die "no unpacked source in ${SRC#$ROOT/}; run scripts/fetch-qemu.sh"

# Patch file names from the series: one per line, '#' comments and blank lines ignored.
series_patches() {
    [[ -f $SERIES ]] || return 0
    sed -e 's/#.*//' "$SERIES" | awk 'NF { print $1 }'
}

mapfile -t FILES < <(overlay_files)
mapfile -t PATCHES < <(series_patches)

for p in "${PATCHES[@]}"; do
    [[ -f $PATCHDIR/$p ]] || die "patch '$p' listed in $SERIES does not exist"
done

patch_hash() {
    {
        cat "$SRC/.mem-share-version"
        for p in "${PATCHES[@]}"; do
            echo "patch $p"
            sha256sum <"$PATCHDIR/$p"
        done
    } | sha256sum | cut -d' ' -f1
}

# Files the patches touch (paths inside the QEMU tree).
patched_files() {
    local p
    for p in "${PATCHES[@]}"; do
        sed -n 's/^+++ \([^\t ]*\).*/\1/p' "$PATCHDIR/$p" | sed 's#^[^/]*/##'
    done | LC_ALL=C sort -u
}

# copy_overlay DEST: copy overlay files whose content differs; prints the count.
copy_overlay() {
    local dest=$1 f mode n=0
    for f in "${FILES[@]}"; do
        if ! cmp -s "$f" "$dest/$f"; then
            mode=0644; [[ -x $f ]] && mode=0755
            install -D -m "$mode" "$f" "$dest/$f"
            n=$((n + 1))
        fi
    done
    echo "$n"
}

# apply_patches DEST
apply_patches() {
    local dest=$1 p out
    for p in "${PATCHES[@]}"; do
        if ! out=$(patch -d "$dest" -p1 --no-backup-if-mismatch --batch -f -s -i "$ROOT/$PATCHDIR/$p" 2>&1); then
            echo "$out" >&2
            die "patch $PATCHDIR/$p failed to apply (tree left in ${dest#$ROOT/} for inspection)"
        fi
    done
}

write_state() {
    mkdir -p "$STATE"
    echo "$HASH" >"$STATE/patches.hash.tmp" && mv "$STATE/patches.hash.tmp" "$STATE/patches.hash"
    printf '%s\n' "${FILES[@]}" >"$STATE/manifest.tmp" && mv "$STATE/manifest.tmp" "$STATE/manifest"
    rm -f "$STATE/dirty"
}

HASH=$(patch_hash)

full=""
if [[ ! -d $STATE ]]; then
    # Fresh unpack that was never touched: work in place.
    mkdir -p "$STATE"
    : >"$STATE/dirty"
    n=$(copy_overlay "$SRC")
    apply_patches "$SRC"
    write_state
    log "$n overlay files, ${#PATCHES[@]} patches applied"
    exit 0
elif [[ -e $STATE/dirty ]]; then
    full="an earlier run stopped half-way"
elif [[ $(cat "$STATE/patches.hash" 2>/dev/null) != "$HASH" ]]; then
    full="the patch series changed"
elif [[ -n $(comm -23 <(LC_ALL=C sort "$STATE/manifest") <(printf '%s\n' "${FILES[@]}" | LC_ALL=C sort)) ]]; then
    full="overlay files were removed"
elif ((${#FILES[@]})) && [[ -n $(comm -12 <(patched_files) <(printf '%s\n' "${FILES[@]}" | LC_ALL=C sort)) ]]; then
    full="patches edit overlay files"
fi

if [[ -z $full ]]; then
    n=$(copy_overlay "$SRC")
    write_state
    ((n == 0)) || log "$n overlay files updated"
    exit 0
fi

log "rebuilding the source tree: $full"
rm -rf "$NEXT"
scripts/fetch-qemu.sh --extract-to "$NEXT"
copy_overlay "$NEXT" >/dev/null
apply_patches "$NEXT"
: >"$STATE/dirty"
/usr/bin/python3 - "$NEXT" "$SRC" "$STATE_NAME" <<'PY'
import filecmp, os, shutil, sys

src, dst, state = sys.argv[1:4]
changed = removed = 0

def same(a, b):
    if os.path.islink(a) or os.path.islink(b):
        return os.path.islink(a) and os.path.islink(b) and os.readlink(a) == os.readlink(b)
    if not os.path.isfile(b):
        return False
    return filecmp.cmp(a, b, shallow=False) and (os.stat(a).st_mode & 0o111) == (os.stat(b).st_mode & 0o111)

wanted = set()
for d, dirs, files in os.walk(src):
    rel = os.path.relpath(d, src)
    if rel == ".":
        dirs[:] = [x for x in dirs if x != state]
    for name in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
        r = os.path.normpath(os.path.join(rel, name))
        wanted.add(r)
        a, b = os.path.join(src, r), os.path.join(dst, r)
        if same(a, b):
            continue
        os.makedirs(os.path.dirname(b), exist_ok=True)
        if os.path.isdir(b) and not os.path.islink(b):
            shutil.rmtree(b)
        elif os.path.lexists(b):
            os.unlink(b)
        if os.path.islink(a):
            os.symlink(os.readlink(a), b)
        else:
            shutil.copyfile(a, b)
            shutil.copymode(a, b)
        changed += 1

for d, dirs, files in os.walk(dst, topdown=False):
    rel = os.path.relpath(d, dst)
    if rel == "." :
        pass
    elif rel.split(os.sep)[0] == state:
        continue
    for name in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
        r = os.path.normpath(os.path.join(rel, name))
        if r.split(os.sep)[0] == state:
            continue
        if r not in wanted:
            os.unlink(os.path.join(dst, r))
            removed += 1
    if rel != "." and not os.listdir(d) and not os.path.isdir(os.path.join(src, rel)):
        os.rmdir(d)
print(f"overlay: synced: {changed} files changed, {removed} removed")
PY
write_state
rm -rf "$NEXT"
log "${#FILES[@]} overlay files, ${#PATCHES[@]} patches applied"
