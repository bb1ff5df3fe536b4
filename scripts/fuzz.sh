#!/bin/bash
# Fuzz the broker with libFuzzer.  Two targets:
#
#   fuzz-proto   the protocol decoder, one frame per input
#                (tests/fuzz/fuzz-proto.c, seeds tests/fuzz/corpus)
#   fuzz-broker  a whole broker, fed scripts of messages from several
#                clients (tests/fuzz/fuzz-broker.c, seeds
#                tests/fuzz/corpus-broker)
#
#   scripts/fuzz.sh [TARGET...]        build build/fuzz/TARGET and fuzz each
#                                      in turn, 300 s each (make fuzz)
#   scripts/fuzz.sh --tap [TARGET...]  the bounded run of make check, one TAP
#                                      line per target: fuzz-proto 25 s,
#                                      fuzz-broker 60 s
#
# FUZZ_TIME=N sets every target's seconds, FUZZ_PROTO_TIME=N and
# FUZZ_BROKER_TIME=N one target's (they win over FUZZ_TIME).  0 replays
# the seeds and the corpus once, without a search (libFuzzer's own
# -max_total_time=0 would search without end).
#
# Built with clang -fsanitize=fuzzer,address,undefined (Debian: clang,
# libclang-rt-14-dev); without them the TAP run is skipped, with the reason.
# The seeds (tests/fuzz/make-corpus.py writes them) are read only: what
# the fuzzer finds goes to build/fuzz/corpus (fuzz-proto) and
# build/fuzz/corpus-broker, an input that crashed, leaked or timed out to
# build/fuzz/crash-* (leak-*, ...) and build/fuzz/broker-crash-* (...),
# never to the tree.  Reproduce one with
#   build/fuzz/fuzz-proto build/fuzz/crash-...
#   MS_FUZZ_VERBOSE=1 build/fuzz/fuzz-broker build/fuzz/broker-crash-...
# Each run prints libFuzzer's final counts: executions, exec/s, coverage
# (cov: edges, ft: features) and the corpus size.

set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/build/fuzz
TAP=0
[ "${1:-}" = "--tap" ] && { TAP=1; shift; }
TARGETS=("$@")
[ ${#TARGETS[@]} = 0 ] && TARGETS=(fuzz-proto fuzz-broker)
CLANG=${CLANG:-clang}

# GLib 2.74's slice allocator hides leaks and frees from ASan and LSan
export G_SLICE=always-malloc

say() { if [ $TAP = 1 ]; then echo "# $*"; else echo "fuzz: $*"; fi; }

n=0
failed=0
# TAP result @1 of the current target: ok, not ok, or SKIP
result() {
    if [ $TAP = 1 ]; then
        echo "$1"
    elif [[ $1 == "not ok"* ]]; then
        echo "fuzz: ${1#*- }" >&2
    else
        echo "fuzz: ${1#*- }"
    fi
}

if [ $TAP = 1 ]; then echo "1..${#TARGETS[@]}"; fi

missing=""
if ! command -v "$CLANG" >/dev/null; then
    missing="$CLANG not installed (Debian package clang)"
elif [ ! -f "$("$CLANG" -print-file-name=libclang_rt.fuzzer-x86_64.a)" ]; then
    missing="no libFuzzer runtime (Debian package libclang-rt-14-dev)"
elif ! command -v pkg-config >/dev/null; then
    missing="pkg-config not installed"
fi
if [ -n "$missing" ]; then
    if [ $TAP = 0 ]; then echo "fuzz: cannot fuzz: $missing" >&2; exit 1; fi
    for t in "${TARGETS[@]}"; do
        n=$((n + 1))
        echo "ok $n - $t # SKIP $missing"
    done
    exit 0
fi

# Build @1 from the sources after it, when one of them, a header or this
# script is newer than the binary
build() {
    local bin=$OUT/$1 stale=0 f
    shift
    [ -x "$bin" ] || stale=1
    for f in "$@" "$ROOT"/include/mem-share/*.h "$ROOT"/tools/mem-share-broker/*.h "$0"; do
        [ "$f" -nt "$bin" ] && stale=1
    done
    [ $stale = 0 ] && return 0
    say "building $bin"
    # shellcheck disable=SC2046
    "$CLANG" -g -O1 -std=gnu11 -Wall -Wextra -Werror \
        -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
        -I"$ROOT/include" -I"$ROOT/tools/mem-share-broker" \
        $(pkg-config --cflags glib-2.0 libxxhash) \
        "$@" $(pkg-config --libs glib-2.0 libxxhash) \
        -o "$bin.tmp" >"$bin.build.log" 2>&1 || return 1
    mv "$bin.tmp" "$bin"
}

# The last value of libFuzzer's @1 (stat::NAME: or NAME: on its status lines)
stat() { sed -n "s/^stat::$1: *//p" "$2" | tail -1; }
status() { grep -o "$1: [0-9]*[a-zA-Z]*/*[0-9]*[a-zA-Z]*" "$2" | tail -1 | sed "s/^$1: //"; }

for t in "${TARGETS[@]}"; do
    n=$((n + 1))
    case $t in
    fuzz-proto)
        srcs=("$ROOT/tests/fuzz/fuzz-proto.c" "$ROOT/hw/mem-share/proto.c"
              "$ROOT/hw/mem-share/ksm.c")
        seeds=$ROOT/tests/fuzz/corpus corpus=$OUT/corpus prefix=$OUT/
        maxlen=16384
        time=${FUZZ_PROTO_TIME:-${FUZZ_TIME:-$([ $TAP = 1 ] && echo 25 || echo 300)}}
        ;;
    fuzz-broker)
        srcs=("$ROOT/tests/fuzz/fuzz-broker.c"
              "$ROOT/tools/mem-share-broker/broker.c"
              "$ROOT/tools/mem-share-broker/config.c"
              "$ROOT/tools/mem-share-broker/held.c"
              "$ROOT/hw/mem-share/proto.c" "$ROOT/hw/mem-share/store.c"
              "$ROOT/hw/mem-share/hash.c" "$ROOT/hw/mem-share/ksm.c")
        seeds=$ROOT/tests/fuzz/corpus-broker corpus=$OUT/corpus-broker
        prefix=$OUT/broker-
        maxlen=4096
        time=${FUZZ_BROKER_TIME:-${FUZZ_TIME:-$([ $TAP = 1 ] && echo 60 || echo 300)}}
        ;;
    *)
        result "not ok $n - $t: no such target (fuzz-proto, fuzz-broker)"
        failed=1
        continue
        ;;
    esac
    mkdir -p "$corpus"
    if ! build "$t" "${srcs[@]}"; then
        sed 's/^/# /' "$OUT/$t.build.log"
        result "not ok $n - $t: build failed (build/fuzz/$t.build.log)"
        failed=1
        continue
    fi
    if [ "$time" = 0 ]; then
        say "$t: replaying the corpus once, no search (corpus ${corpus#"$ROOT"/}, seeds ${seeds#"$ROOT"/})"
    else
        say "$t: fuzzing for $time s (corpus ${corpus#"$ROOT"/}, seeds ${seeds#"$ROOT"/})"
    fi
    log=$OUT/$t.log
    runs=()
    [ "$time" = 0 ] && runs=(-runs=0)
    "$OUT/$t" "${runs[@]}" -max_total_time="$time" -max_len=$maxlen -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$prefix" \
        "$corpus" "$seeds" >"$log" 2>&1
    rc=$?
    execs=$(stat number_of_executed_units "$log")
    rate=$(stat average_exec_per_sec "$log")
    cov=$(status cov "$log") ft=$(status ft "$log") corp=$(status corp "$log")
    say "$t: ${execs:-?} executions in $time s (${rate:-?}/s), cov ${cov:-?}," \
        "ft ${ft:-?}, corpus ${corp:-?} (inputs/bytes)"
    if [ $rc != 0 ]; then
        tail -60 "$log" | sed 's/^/# /'
        unit=$(sed -n 's/.*Test unit written to //p' "$log" | tail -1)
        result "not ok $n - $t: the fuzzer failed (exit $rc, ${log#"$ROOT"/}): input ${unit#"$ROOT"/}"
        failed=1
        continue
    fi
    result "ok $n - $t: ${execs:-?} inputs in $time s, cov ${cov:-?}, ft ${ft:-?}, no failure"
done
exit $failed
