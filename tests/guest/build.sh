#!/bin/bash
# Build the guest artifacts of the mem-share real-guest tests.
#
#   tests/guest/build.sh OUTDIR        (make guest: OUTDIR=build/guest)
#
# Produces
#   OUTDIR/vmlinuz             Debian's kernel (the package linux-image-amd64
#                              depends on), fetched with apt-get download and
#                              unpacked with dpkg-deb: nothing is installed
#   OUTDIR/workload            static guest workload (also runs on the host)
#   OUTDIR/modules/*.ko        the kernel's virtio modules (virtio-blk,
#                              virtio-balloon, virtio-mem and what they need)
#   OUTDIR/initramfs.cpio.gz   /init = workload, /dev/console, /proc, /dev,
#                              /lib/modules/*.ko (loaded with ms.virtio=1)
#   OUTDIR/tiny.elf            32-bit multiboot test guest
#   OUTDIR/fleet.cpio.gz       the fleet guest: a minimal Debian 12 root with
#                              python3, sqlite3 and perl services and its
#                              manifest (fleet/mkimage.sh; .debs in dl/fleet)
#
# Idempotent: each artifact is rebuilt only when missing or older than its
# inputs; the kernel is fetched again only when the package changes.
set -eu

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$1
SRC=$(cd "$(dirname "$0")" && pwd)
SELF="$SRC/build.sh"
CC=${CC:-gcc}
mkdir -p "$OUT/dl"
OUT=$(cd "$OUT" && pwd)

log() { echo "guest: $*"; }

# Modules of the device tests, in load order (each after what it needs),
# as paths below lib/modules/VERSION/.  The workload loads them in this
# order when the command line says ms.virtio=1 (workload.c's list).
MODULES="kernel/drivers/virtio/virtio_ring kernel/drivers/virtio/virtio
kernel/drivers/virtio/virtio_pci_legacy_dev
kernel/drivers/virtio/virtio_pci_modern_dev kernel/drivers/virtio/virtio_pci
kernel/drivers/block/virtio_blk kernel/drivers/virtio/virtio_balloon
kernel/drivers/virtio/virtio_mem"

# needs TARGET DEP... : true if TARGET is missing or older than any DEP
needs() {
    _tgt=$1; shift
    [ -e "$_tgt" ] || return 0
    for _d in "$@"; do
        [ "$_d" -nt "$_tgt" ] && return 0
    done
    return 1
}

# ---------------------------------------------------------------- kernel
kernel_pkg() {
    # The image package linux-image-amd64 depends on, e.g.
    # linux-image-6.1.0-56-amd64 (the signed build; it holds boot/vmlinuz-*).
    apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: *\(linux-image-[^ ]*\).*/\1/p' | head -n 1
}

candidate() {
    apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *\([^(]\)/\1/p'
}

fetch_kernel() {
    # Up to date: the kernel was fetched after apt's package lists last
    # changed (asking apt costs seconds; skip it when nothing can differ).
    if [ -s "$OUT/vmlinuz" ] && [ -f "$OUT/vmlinuz.pkg" ] &&
       [ -d "$OUT/modules" ] && ! needs "$OUT/vmlinuz.pkg" /var/lib/apt/lists "$SELF"; then
        return 0
    fi
    pkg=$(kernel_pkg || true)
    ver=
    [ -z "$pkg" ] || ver=$(candidate "$pkg")
    if [ -z "$ver" ]; then
        if [ -s "$OUT/vmlinuz" ]; then
            log "apt knows no kernel package; keeping existing $OUT/vmlinuz"
            return 0
        fi
        log "apt-cache knows no candidate for linux-image-amd64: apt-get update"
        apt-get update -qq
        pkg=$(kernel_pkg)
        [ -z "$pkg" ] || ver=$(candidate "$pkg")
        if [ -z "$ver" ]; then
            echo "guest: cannot resolve the package linux-image-amd64 depends on" >&2
            exit 1
        fi
    fi
    stamp="$pkg $ver $(echo $MODULES | md5sum | cut -c1-8)"
    if [ -s "$OUT/vmlinuz" ] && [ -f "$OUT/vmlinuz.pkg" ] &&
       [ "$(cat "$OUT/vmlinuz.pkg")" = "$stamp" ]; then
        touch "$OUT/vmlinuz.pkg"
        return 0
    fi
    log "fetching $pkg $ver (apt-get download, not installed)"
    rm -f "$OUT"/dl/linux-image-*.deb
    # apt-get download writes into the current directory. Running as root,
    # apt drops privileges to _apt, which may not write OUTDIR: stay root.
    if ! (cd "$OUT/dl" &&
          apt-get -q -o APT::Sandbox::User=root download "$pkg=$ver" >/dev/null); then
        if [ -s "$OUT/vmlinuz" ]; then
            log "WARNING: download of $pkg $ver failed; keeping $OUT/vmlinuz" \
                "($(cat "$OUT/vmlinuz.pkg" 2>/dev/null || echo unknown))"
            return 0
        fi
        echo "guest: apt-get download $pkg=$ver failed" >&2
        exit 1
    fi
    set -- "$OUT"/dl/"$pkg"_*.deb
    deb=$1
    if [ ! -f "$deb" ]; then
        echo "guest: apt-get download left no $pkg .deb in $OUT/dl" >&2
        exit 1
    fi
    tmp="$OUT/dl/x"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    # Same as dpkg-deb -x, restricted to boot/ and the few modules the
    # device tests load (Debian builds virtio as modules); all of them would
    # cost hundreds of MB.
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards './boot/vmlinuz-*' \
        $(for m in $MODULES; do echo "./lib/modules/*/$m.ko"; done)
    set -- "$tmp"/boot/vmlinuz-*
    if [ ! -s "$1" ]; then
        echo "guest: no boot/vmlinuz-* in $deb" >&2
        exit 1
    fi
    rm -rf "$OUT/modules"
    mkdir -p "$OUT/modules"
    for m in $MODULES; do
        set -- "$tmp"/lib/modules/*/"$m.ko"
        if [ ! -s "$1" ]; then
            echo "guest: no $m.ko in $deb" >&2
            exit 1
        fi
        cp "$1" "$OUT/modules/"
    done
    set -- "$tmp"/boot/vmlinuz-*
    cp "$1" "$OUT/vmlinuz.new"
    mv "$OUT/vmlinuz.new" "$OUT/vmlinuz"
    echo "$stamp" > "$OUT/vmlinuz.pkg"
    rm -rf "$tmp"
    log "kernel: $OUT/vmlinuz ($(basename "$1"))"
}

# ---------------------------------------------------------------- workload
build_workload() {
    if needs "$OUT/workload" "$SRC/workload/workload.c" "$SELF"; then
        log "building workload"
        $CC -static -O2 -Wall -Wextra -o "$OUT/workload.new" \
            "$SRC/workload/workload.c"
        mv "$OUT/workload.new" "$OUT/workload"
    fi
    if needs "$OUT/initramfs.cpio.gz" "$OUT/workload" "$SELF" "$OUT/vmlinuz.pkg"; then
        log "building initramfs"
        # newc archive written directly (no root needed for the device node,
        # reproducible: fixed owners and mtimes).
        python3 - "$OUT/workload" "$OUT/initramfs.cpio" "$OUT"/modules/*.ko <<'EOF'
import sys

def entry(name, mode, data=b"", rdev=(0, 0), ino=[100]):
    ino[0] += 1
    name_b = name.encode() + b"\0"
    hdr = "070701" + "".join("%08x" % v for v in (
        ino[0], mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
        len(name_b), 0))
    out = hdr.encode() + name_b
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out

import os
init = open(sys.argv[1], "rb").read()
mods = [entry("lib/modules/" + os.path.basename(m), 0o100644,
              open(m, "rb").read()) for m in sorted(sys.argv[3:])]
arc = b"".join([
    entry("dev", 0o040755),
    entry("dev/console", 0o020600, rdev=(5, 1)),
    entry("proc", 0o040555),
    entry("sys", 0o040555),
    entry("lib", 0o040755),
    entry("lib/modules", 0o040755),
] + mods + [
    entry("init", 0o100755, init),
    entry("TRAILER!!!", 0),
])
arc += b"\0" * (-len(arc) % 512)
open(sys.argv[2], "wb").write(arc)
EOF
        gzip -9nf "$OUT/initramfs.cpio"
    fi
}

# ---------------------------------------------------------------- tiny guest
build_tiny() {
    t="$SRC/tiny"
    if needs "$OUT/tiny.elf" "$t/entry.S" "$t/tiny.c" "$t/link.ld" "$SELF"; then
        log "building tiny.elf"
        # No gcc-multilib needed: freestanding, no libc, no libgcc.
        $CC -m32 -ffreestanding -fno-pic -fno-stack-protector -nostdlib \
            -static -O2 -Wall -Wextra -fno-asynchronous-unwind-tables \
            -Wl,-melf_i386 -Wl,-T,"$t/link.ld" -Wl,--build-id=none \
            -Wl,--no-warn-rwx-segments \
            -o "$OUT/tiny.elf.new" "$t/entry.S" "$t/tiny.c"
        mv "$OUT/tiny.elf.new" "$OUT/tiny.elf"
    fi
}

# ---------------------------------------------------------------- fleet
build_fleet() {
    # fleet/mkimage.sh decides itself what is out of date (its inputs, the
    # versions apt resolves); it runs the guest with build/guest/vmlinuz.
    "$SRC/fleet/mkimage.sh" "$OUT"
}

fetch_kernel
build_workload
build_tiny
build_fleet
