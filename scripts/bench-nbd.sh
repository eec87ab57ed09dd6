#!/usr/bin/env bash
# Reads through overlaybd-nbd against reads of the same layer stack
# in-process, printed as ratios (NBD / in-process), by
# blockdev/examples/nbd_bench.rs (medians of alternating rounds):
#
#   1. warm page cache, the given stack (default: the upstream reference
#      fixture ext4_64 + commit.lsmt): sequential 1 MiB reads, random 4 KiB
#      reads at queue depth 1 and 16, simple and structured replies, and
#      simple replies again with the server's busy polling off (the server
#      sleeping in read between batches, as before it polled);
#   2. cold page cache (posix_fadvise DONTNEED on the layer files only), a
#      300 MB layer made from /usr: random 4 KiB reads, with the io_uring
#      engine (batches of reads in flight) and with plain pread;
#   3. a real client: nbdcopy of the whole export (block status skips holes).
#
# Random reads are compared with the faster in-process way: one read at a
# time, or batches of 16 through read_many (as the server reads 16 requests
# in flight); the CPU time per read (client + server) is printed too.
#
# usage: scripts/bench-nbd.sh [LAYER...]   (ROUNDS, BENCH_PRIO, BENCH_DIR:
#        see bench-lib.sh; the cold test needs BENCH_DIR on a real disk)
set -euo pipefail
case ${1:-} in -h | --help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
FX="${OVERLAYBD_FIXTURES:-$(cd .. && pwd)/shared/fixtures/overlaybd-reference}"
[ -d "$FX" ] || FX=/work/shared/fixtures/overlaybd-reference
if [ $# -eq 0 ]; then
    set -- "$FX/baselayer/ext4_64" "$FX/baselayer/commit.lsmt"
fi
for l in "$@"; do [ -f "$l" ] || { echo "bench-nbd: no such layer: $l" >&2; exit 1; }; done

echo "== building (release)"
cargo build --release -q -p blockdev --example nbd_bench
cargo build --release -q -p overlaybd-tools --bin overlaybd-nbd --bin overlaybd-create --bin overlaybd-commit
BIN=$CARGO_TARGET_DIR/release
W=$(mktemp -d "${BENCH_DIR:-/tmp}/bench-nbd.XXXXXX")
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$W"; rm -f "$BENCH_ERR"' EXIT

echo "== warm page cache, simple replies"
"$BIN/examples/nbd_bench" --rounds "$ROUNDS" "$@"
echo "== warm page cache, structured replies"
"$BIN/examples/nbd_bench" --rounds "$ROUNDS" --structured "$@" | tail -5
echo "== warm page cache, simple replies, busy polling off (--busy-poll-us 0)"
"$BIN/examples/nbd_bench" --rounds "$ROUNDS" --busy-poll-us 0 "$@" | tail -5

echo "== cold page cache: a 300 MB layer of /usr data in $W"
tar -cf - /usr/lib /usr/share 2>/dev/null | head -c $((300 << 20)) >"$W/payload" || true
"$BIN/overlaybd-create" -s "$W/data" "$W/index" 64 >/dev/null
dd if="$W/payload" of="$W/data" bs=1M oflag=seek_bytes seek=4096 conv=notrunc status=none
rm -f "$W/payload"
"$BIN/overlaybd-commit" "$W/data" "$W/index" "$W/layer.lsmt" >/dev/null 2>&1
rm -f "$W/data" "$W/index"
for io in auto pread; do
    echo "-- file I/O: $io"
    OVERLAYBD_IO=$io "$BIN/examples/nbd_bench" --cold --rounds 3 --ops 5000 "$W/layer.lsmt" | tail -5
done

echo "== whole-export copy with a real client: nbdcopy (block status skips holes)"
"$BIN/overlaybd-nbd" serve "$@" --read-only --socket "$W/s.sock" >"$W/log" 2>&1 &
pid=$!
for _ in $(seq 50); do [ -S "$W/s.sock" ] && break; sleep 0.1; done
uri="nbd+unix:///?socket=$W/s.sock"
data=$(nbdinfo --map --totals "$uri" | awk '$3 == 0 { print $1 }')
for _ in $(seq "$ROUNDS"); do bench_run nbdcopy nbdcopy "$uri" null:; done
kill -TERM "$pid"; wait "$pid" || true; pid=
awk -v d="${data:-0}" -v s="$(bench_median nbdcopy)" -v sp="$(bench_spread nbdcopy)" \
    'BEGIN { printf "nbdcopy of the whole export (%d mapped bytes): %.3f s (spread %s), %.0f MiB/s of mapped data\n", d, s, sp, d / 1048576 / s }'
