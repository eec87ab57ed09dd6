#!/usr/bin/env bash
# overlaybd-commit on a few hundred MB of real layer data (a tar of /usr),
# single-threaded and on every core, next to baselines measured in the same
# alternating runs: a plain (uncompressed) commit, the I/O and compaction
# floor, and the lz4/zstd command-line tools compressing the same bytes as
# one stream (lz4 -1; zstd -3 on one thread and on every core).
#
# usage: scripts/bench-commit.sh [MB]   (default 300; ROUNDS, BENCH_PRIO,
#        BENCH_DIR: see bench-lib.sh; the work files go to /dev/shm when it
#        has room, so that the disk does not set the pace)
set -euo pipefail
case ${1:-} in -h | --help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
MB=${1:-300}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p overlaybd-tools --bin overlaybd-commit --bin overlaybd-create
BIN=$CARGO_TARGET_DIR/release
N=$(nproc)
base=${BENCH_DIR:-}
if [[ -z $base ]]; then
  base=/tmp
  if [[ -d /dev/shm ]] && (($(df -k --output=avail /dev/shm | tail -1) > MB * 1024 * 4)); then
    base=/dev/shm
  fi
fi
W=$(mktemp -d "$base/bench-commit.XXXXXX")
trap 'rm -rf "$W"; rm -f "$BENCH_ERR"' EXIT

echo "preparing $MB MB of layer data from /usr in $W ..."
tar -cf - /usr/lib /usr/share 2>/dev/null | head -c $((MB << 20)) >"$W/payload" || true
SIZE=$(stat -c %s "$W/payload")
"$BIN/overlaybd-create" -s "$W/data" "$W/index" 64 >/dev/null
# a sparse layer keeps logical byte X at file offset 4096 + X
dd if="$W/payload" of="$W/data" bs=1M oflag=seek_bytes seek=4096 conv=notrunc status=none

commit() { rm -f "$W/out"; "$BIN/overlaybd-commit" "$@" "$W/data" "$W/index" "$W/out"; }
for _ in $(seq "$ROUNDS"); do
  bench_run plain commit
  bench_run lz4-1 commit -z --threads 1
  bench_run lz4-n commit -z --threads "$N"
  bench_run zstd-1 commit -z --algorithm zstd --threads 1
  bench_run zstd-n commit -z --algorithm zstd --threads "$N"
  if command -v lz4 >/dev/null; then bench_run lz4cli lz4 -1 -f "$W/payload" "$W/p.lz4"; fi
  if command -v zstd >/dev/null; then
    bench_run zstdcli-1 zstd -q -3 -f -T1 "$W/payload" -o "$W/p.zst"
    bench_run zstdcli-n zstd -q -3 -f -T"$N" "$W/payload" -o "$W/p.zst"
  fi
done
# the thread count never changes the bytes
for t in 1 "$N"; do
  commit -z --threads "$t" >/dev/null 2>&1
  sha256sum <"$W/out" >"$W/sum.$t"
done
cmp -s "$W/sum.1" "$W/sum.$N" || { echo "bench-commit: output differs between 1 and $N threads" >&2; exit 1; }

echo "input $((SIZE >> 20)) MiB, $N cores"
bench_header
bench_row "overlaybd-commit (plain, I/O floor)" plain "$SIZE"
bench_row "overlaybd-commit -z lz4, 1 thread" lz4-1 "$SIZE"
bench_row "overlaybd-commit -z lz4, $N threads" lz4-n "$SIZE"
bench_row "overlaybd-commit -z zstd, 1 thread" zstd-1 "$SIZE"
bench_row "overlaybd-commit -z zstd, $N threads" zstd-n "$SIZE"
[[ -n ${BENCH_SAMPLES[lz4cli]:-} ]] && bench_row "lz4 -1 CLI (one stream)" lz4cli "$SIZE"
[[ -n ${BENCH_SAMPLES[zstdcli-1]:-} ]] && bench_row "zstd -3 -T1 CLI (one stream)" zstdcli-1 "$SIZE"
[[ -n ${BENCH_SAMPLES[zstdcli-n]:-} ]] && bench_row "zstd -3 -T$N CLI (one stream)" zstdcli-n "$SIZE"
echo "speed-up on $N threads (time 1 thread / time $N threads): lz4 $(bench_ratio lz4-1 lz4-n), zstd $(bench_ratio zstd-1 zstd-n)"
if [[ -n ${BENCH_SAMPLES[zstdcli-n]:-} ]]; then
  # What this machine gave a second thread during the run: the zstd CLI's own
  # speed-up (near $N on idle cores, near 1 when other work holds them).
  echo "reference: zstd CLI speed-up on $N threads in the same run: $(bench_ratio zstdcli-1 zstdcli-n)"
fi
if [[ -n ${BENCH_SAMPLES[lz4cli]:-} ]]; then
  echo "time ours / CLI: lz4 $N threads / lz4 -1: $(bench_ratio lz4-n lz4cli); zstd $N threads / zstd -T$N: $(bench_ratio zstd-n zstdcli-n); zstd 1 thread / zstd -T1: $(bench_ratio zstd-1 zstdcli-1)"
fi
echo "outputs identical for 1 and $N threads: yes"
