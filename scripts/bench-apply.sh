#!/usr/bin/env bash
# Benchmark overlaybd-apply on a large real layer tar.
#
# Usage: scripts/bench-apply.sh [SOURCE]
#   SOURCE is a directory to tar (default /usr) or an existing .tar file.
#   BENCH_DIR sets where temporary files go (default: a new dir in /tmp);
#   everything created there is deleted at the end.
#
# Times, in one run and on the same disk:
#   1. cp of the tar to a new file + sync        (the disk floor)
#   2. GNU tar -x into a directory + sync        (the kernel's own fs)
#   3. overlaybd-apply --raw on a fresh 64 GiB sparse image made with
#      overlaybd-create --raw --mkfs
#   4. overlaybd-apply on an overlaybd stack: a sparse writable LSMT layer
#      made with overlaybd-create -s --mkfs, through config.json, the tar
#      streamed on stdin (how the convertor runs it)
# and prints seconds, MB/s (tar bytes / s) and files/s for each; the ext4
# results are checked with e2fsck -fn.
set -euo pipefail
case ${1:-} in -h | --help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."

SRC=${1:-/usr}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
echo "building release binaries..." >&2
cargo build --release -q -p overlaybd-tools --bin overlaybd-apply --bin overlaybd-create
BIN=$CARGO_TARGET_DIR/release

WORK=$(mktemp -d "${BENCH_DIR:-/tmp}/bench-apply.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

if [[ -f $SRC ]]; then
  TAR=$SRC
else
  TAR=$WORK/layer.tar
  need=$(( $(du -sxk "$SRC" | cut -f1) * 1024 ))
  avail=$(( $(df -k --output=avail "$WORK" | tail -1) * 1024 ))
  # tar + one extracted copy at a time, with margin
  if (( avail < need * 5 / 2 )); then
    echo "not enough space in $WORK: need about $((need * 5 / 2 >> 30)) GiB, have $((avail >> 30)) GiB" >&2
    exit 1
  fi
  echo "creating a tar of $SRC..." >&2
  tar -C "$(dirname "$SRC")" --numeric-owner --xattrs --xattrs-include='*' -cf "$TAR" "$(basename "$SRC")" 2>/dev/null || true
fi
BYTES=$(stat -c %s "$TAR")
ENTRIES=$(tar -tf "$TAR" | wc -l)
FILES=$(tar -tvf "$TAR" | grep -c '^-' || true)

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { print b - a }'; }
row() { # name seconds
  awk -v n="$1" -v s="$2" -v b="$BYTES" -v f="$FILES" \
    'BEGIN { printf "%-44s %8.2f %9.0f %10.0f\n", n, s, b / s / 1e6, f / s }'
}

awk -v s="$SRC" -v b="$BYTES" -v e="$ENTRIES" -v f="$FILES" \
  'BEGIN { printf "source: %s, %.2f GB tar, %d entries, %d regular files\n\n", s, b / 1e9, e, f }'
printf "%-44s %8s %9s %10s\n" "what" "seconds" "MB/s" "files/s"

sync
t0=$(now); cp "$TAR" "$WORK/copy.tar"; sync; t1=$(now)
row "cp tar + sync (disk floor)" "$(secs "$t0" "$t1")"
rm -f "$WORK/copy.tar"

mkdir "$WORK/x"; sync
t0=$(now); tar -C "$WORK/x" --numeric-owner -xf "$TAR"; sync; t1=$(now)
row "GNU tar -x + sync (kernel filesystem)" "$(secs "$t0" "$t1")"
rm -rf "$WORK/x"

"$BIN/overlaybd-create" --raw --mkfs "$WORK/img" "$WORK/unused" 64 >/dev/null; sync
t0=$(now); "$BIN/overlaybd-apply" --raw "$TAR" "$WORK/img" >/dev/null 2>"$WORK/apply.log"; t1=$(now)
row "overlaybd-apply --raw (64 GiB sparse image)" "$(secs "$t0" "$t1")"
e2fsck -fn "$WORK/img" >/dev/null 2>&1 || { echo "e2fsck found errors in the raw image" >&2; exit 1; }
rm -f "$WORK/img" "$WORK/unused"

"$BIN/overlaybd-create" -s "$WORK/data" "$WORK/index" 64 --mkfs >/dev/null
cat >"$WORK/config.json" <<EOF
{"lowers": [], "upper": {"data": "$WORK/data", "index": "$WORK/index"}, "resultFile": "$WORK/result"}
EOF
sync
t0=$(now); "$BIN/overlaybd-apply" - "$WORK/config.json" <"$TAR" >/dev/null 2>"$WORK/apply.log"; t1=$(now)
row "overlaybd-apply, LSMT upper, stdin" "$(secs "$t0" "$t1")"
[[ $(cat "$WORK/result") == success ]] || { echo "apply failed: $(cat "$WORK/result")" >&2; exit 1; }
echo
tail -1 "$WORK/apply.log"
