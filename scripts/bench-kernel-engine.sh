#!/usr/bin/env bash
# Kernel apply engine vs libext2fs engine on the same layer, in one run.
#
# Usage: sudo scripts/bench-kernel-engine.sh [SOURCE]
#   SOURCE is a directory to tar (default /usr/lib/python3*, a few hundred
#   MB of many small files) or an existing .tar file. BENCH_DIR sets where
#   temporary files go (default: a new dir in /tmp); all of it is deleted.
#
# For each engine, on a fresh sparse writable LSMT layer of 64 GiB, as the
# convertor makes the bottom layer: overlaybd-create -s --mkfs [--engine E]
# then overlaybd-apply [--engine E] with the tar streamed on stdin. Prints
# seconds for mkfs and apply, tar MB/s and files/s of the apply, the size of
# the layer's data. (Correctness of both engines' output, e2fsck and tree
# equality, is what crates/kernel/tests/engine.rs checks.)
# Needs root (the kernel engine mounts FUSE, a loop device and ext4).
set -euo pipefail
case ${1:-} in -h | --help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."

if [[ $(id -u) != 0 ]]; then
  echo "the kernel engine needs root; run as root" >&2
  exit 1
fi
SRC=${1:-$(ls -d /usr/lib/python3* | head -1)}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
echo "building release binaries..." >&2
cargo build --release -q -p overlaybd-tools --bin overlaybd-apply --bin overlaybd-create
BIN=$CARGO_TARGET_DIR/release

WORK=$(mktemp -d "${BENCH_DIR:-/tmp}/bench-kernel.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

if [[ -f $SRC ]]; then
  TAR=$SRC
else
  TAR=$WORK/layer.tar
  echo "creating a tar of $SRC..." >&2
  tar -C "$(dirname "$SRC")" --numeric-owner --xattrs --xattrs-include='*' -cf "$TAR" "$(basename "$SRC")" 2>/dev/null || true
fi
BYTES=$(stat -c %s "$TAR")
FILES=$(tar -tvf "$TAR" | grep -c '^-' || true)
awk -v s="$SRC" -v b="$BYTES" -v f="$FILES" \
  'BEGIN { printf "source: %s, %.1f MB tar, %d regular files; load: %s\n\n", s, b / 1e6, f, "'"$(cut -d' ' -f1-3 /proc/loadavg)"'" }'
printf "%-10s %8s %9s %8s %10s %10s\n" engine "mkfs s" "apply s" "MB/s" "files/s" "layer MB"

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

for engine in libext2fs kernel; do
  d=$WORK/$engine
  mkdir -p "$d"
  t0=$(now)
  "$BIN/overlaybd-create" -s --mkfs --engine "$engine" "$d/data" "$d/index" 64 >/dev/null
  t1=$(now)
  cat >"$d/config.json" <<JSON
{"lowers": [], "upper": {"data": "$d/data", "index": "$d/index"}, "resultFile": "$d/result"}
JSON
  "$BIN/overlaybd-apply" --engine "$engine" - "$d/config.json" <"$TAR" >/dev/null 2>"$d/log" ||
    { cat "$d/log" >&2; exit 1; }
  t2=$(now)
  mkfs_s=$(secs "$t0" "$t1")
  apply_s=$(secs "$t1" "$t2")
  layer_mb=$(du -sm "$d/data" | cut -f1)
  awk -v e="$engine" -v m="$mkfs_s" -v a="$apply_s" -v b="$BYTES" -v f="$FILES" -v l="$layer_mb" \
    'BEGIN { printf "%-10s %8.2f %9.2f %8.0f %10.0f %10d\n", e, m, a, b / a / 1e6, f / a, l }'
  grep -qx success "$d/result" || { echo "$engine: $(cat "$d/result")" >&2; exit 1; }
  rm -rf "$d"
done
