#!/bin/bash
# Fuzz the broker protocol decoder with libFuzzer.
#
#   scripts/fuzz.sh           build build/fuzz/fuzz-proto, fuzz for $FUZZ_TIME s (300)
#   scripts/fuzz.sh --tap     the bounded run of make check: $FUZZ_TIME s (25), TAP
#
# Built with clang -fsanitize=fuzzer,address,undefined (Debian: clang,
# libclang-rt-14-dev); without them the TAP run is skipped, with the reason.
# The seeds (tests/fuzz/corpus, from tests/fuzz/make-corpus.py) are read
# only: what the fuzzer finds goes to build/fuzz/corpus, and a crashing
# input to build/fuzz/crash-*.  Reproduce one with
#   build/fuzz/fuzz-proto build/fuzz/crash-...

set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/build/fuzz
BIN=$OUT/fuzz-proto
SRCS=("$ROOT/tests/fuzz/fuzz-proto.c" "$ROOT/hw/mem-share/proto.c" "$ROOT/hw/mem-share/ksm.c")
TAP=0
[ "${1:-}" = "--tap" ] && TAP=1
TIME=${FUZZ_TIME:-$([ $TAP = 1 ] && echo 25 || echo 300)}
CLANG=${CLANG:-clang}

say() { if [ $TAP = 1 ]; then echo "# $*"; else echo "fuzz: $*"; fi; }

skip() {
    if [ $TAP = 1 ]; then echo "1..1"; echo "ok 1 - fuzz-proto # SKIP $*"; exit 0; fi
    echo "fuzz: cannot fuzz: $*" >&2
    exit 1
}

fail() {
    if [ $TAP = 1 ]; then echo "1..1"; echo "not ok 1 - fuzz-proto: $*"; else echo "fuzz: $*" >&2; fi
    exit 1
}

command -v "$CLANG" >/dev/null || skip "$CLANG not installed (Debian package clang)"
rt=$("$CLANG" -print-file-name=libclang_rt.fuzzer-x86_64.a)
[ -f "$rt" ] || skip "no libFuzzer runtime (Debian package libclang-rt-14-dev)"
command -v pkg-config >/dev/null || skip "pkg-config not installed"

# Rebuild when a source or header is newer than the binary
mkdir -p "$OUT/corpus"
stale=0
[ -x "$BIN" ] || stale=1
for f in "${SRCS[@]}" "$ROOT"/include/mem-share/*.h "$0"; do
    [ "$f" -nt "$BIN" ] && stale=1
done
if [ $stale = 1 ]; then
    say "building $BIN"
    # shellcheck disable=SC2046
    "$CLANG" -g -O1 -std=gnu11 -Wall -Wextra -Werror \
        -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
        -I"$ROOT/include" $(pkg-config --cflags glib-2.0) \
        "${SRCS[@]}" $(pkg-config --libs glib-2.0) -o "$BIN.tmp" >"$OUT/build.log" 2>&1 \
        || { sed 's/^/# /' "$OUT/build.log"; fail "build failed (build/fuzz/build.log)"; }
    mv "$BIN.tmp" "$BIN"
fi

say "fuzzing for $TIME s (corpus build/fuzz/corpus, seeds tests/fuzz/corpus)"
log=$OUT/fuzz.log
"$BIN" -max_total_time="$TIME" -max_len=16384 -timeout=10 -rss_limit_mb=1024 \
    -print_final_stats=1 -artifact_prefix="$OUT/" \
    "$OUT/corpus" "$ROOT/tests/fuzz/corpus" >"$log" 2>&1
rc=$?
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
if [ $rc != 0 ]; then
    tail -40 "$log" | sed 's/^/# /'
    fail "the fuzzer failed (exit $rc, $log); inputs in build/fuzz/crash-*"
fi
if [ $TAP = 1 ]; then
    echo "1..1"
    echo "ok 1 - fuzz-proto: ${execs:-?} inputs in $TIME s, no failure"
else
    echo "fuzz: ${execs:-?} inputs in $TIME s, no failure ($log)"
fi
