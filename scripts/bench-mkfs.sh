#!/usr/bin/env bash
# overlaybd-create -s --mkfs against mke2fs making the same filesystem (4 KiB
# blocks, 256-byte inodes, one inode per 16 KiB, no journal, no
# metadata_csum, no uninit_bg, sparse_super2, one group per flex group) on a
# sparse file of the same size, in alternating runs.
#
# usage: scripts/bench-mkfs.sh [GB]    (default 64; ROUNDS, default 9 here, and BENCH_PRIO:
#        see bench-lib.sh)
set -euo pipefail
case ${1:-} in -h | --help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-9}
source scripts/bench-lib.sh
GB=${1:-64}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p overlaybd-tools --bin overlaybd-create
BIN=$CARGO_TARGET_DIR/release
command -v mke2fs >/dev/null || { echo "bench-mkfs: mke2fs not found (Debian: e2fsprogs)" >&2; exit 1; }
W=$(mktemp -d "${BENCH_DIR:-/tmp}/bench-mkfs.XXXXXX")
trap 'rm -rf "$W"; rm -f "$BENCH_ERR"' EXIT

ours() { rm -f "$W/d" "$W/i"; "$BIN/overlaybd-create" -s "$W/d" "$W/i" "$GB" --mkfs; }
theirs() {
  rm -f "$W/m.img"
  truncate -s "${GB}G" "$W/m.img"
  mke2fs -q -F -t ext4 -b 4096 -I 256 -i 16384 -G 1 \
    -O ^has_journal,^metadata_csum,^uninit_bg,sparse_super2 "$W/m.img"
}
for _ in $(seq "$ROUNDS"); do
  bench_run ours ours
  bench_run mke2fs theirs
done
echo "mkfs of a $GB GiB filesystem"
bench_header
bench_row "overlaybd-create -s data index $GB --mkfs" ours
bench_row "mke2fs, same features, sparse file" mke2fs
echo "ratio overlaybd-create / mke2fs: $(bench_ratio ours mke2fs)"
echo "written: overlaybd layer $(du -k "$W/d" | cut -f1) KiB, mke2fs image $(du -k "$W/m.img" | cut -f1) KiB"
