#!/usr/bin/env bash
# Read throughput through overlaybd-nbd versus reading the same layer stack
# in-process, printed as ratios (NBD / in-process).
#
#   scripts/bench-nbd.sh [LAYER...]
#
# Default stack: the upstream reference fixture ext4_64 + commit.lsmt.
# Needs libnbd-bin (nbdcopy) for the real-client figure.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
FX="${OVERLAYBD_FIXTURES:-$(cd .. && pwd)/shared/fixtures/overlaybd-reference}"
[ -d "$FX" ] || FX=/work/shared/fixtures/overlaybd-reference
if [ $# -eq 0 ]; then
    set -- "$FX/baselayer/ext4_64" "$FX/baselayer/commit.lsmt"
fi
for l in "$@"; do [ -f "$l" ] || { echo "bench-nbd: no such layer: $l" >&2; exit 1; }; done

echo "== building (release)"
cargo build --release -q -p blockdev --example nbd_bench
cargo build --release -q -p overlaybd-tools --bin overlaybd-nbd

for io in uring pread; do
    echo "== in-process vs NBD (our client), file I/O over $io"
    OVERLAYBD_IO=$io "$CARGO_TARGET_DIR/release/examples/nbd_bench" "$@"
done

echo "== whole-export copy with a real client: nbdcopy (block status skips holes) vs in-process flatten"
tmp=$(mktemp -d)
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$tmp"' EXIT
"$CARGO_TARGET_DIR/release/overlaybd-nbd" serve "$@" --read-only --socket "$tmp/s.sock" > "$tmp/log" 2>&1 &
pid=$!
for _ in $(seq 50); do [ -S "$tmp/s.sock" ] && break; sleep 0.1; done
uri="nbd+unix:///?socket=$tmp/s.sock"
data=$(nbdinfo --map --totals "$uri" | awk '$3 == 0 { print $1 }')
t0=$(date +%s.%N)
nbdcopy "$uri" null:
t1=$(date +%s.%N)
nbd_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
kill -TERM "$pid"; wait "$pid" || true; pid=
awk -v d="${data:-0}" -v s="$nbd_s" \
    'BEGIN { printf "nbdcopy of the whole export (%d mapped bytes): %.3f s, %.1f MiB/s of mapped data\n", d, s, d / 1048576 / s }'
