#!/usr/bin/env bash
# Benchmark the EROFS TurboOCI metadata writer on a real layer.
#
# Usage: scripts/bench-erofs.sh [SOURCE]
#   SOURCE is a directory to tar (default /usr/share) or an existing .tar.
#   BENCH_DIR sets where the temporary tar goes (default: a new dir in
#   /tmp); it is deleted at the end.
#
# Runs the criterion bench `erofs` (benches/benches/erofs.rs) on the tar:
# building the bottom layer's EROFS metadata from it, an upper layer (every
# 10th file replaced, every 10th whited out) on top, and the ext4 TurboOCI
# path (mkfs + apply in reference mode) on the same tar. Prints the
# metadata sizes against the tar size and the criterion times.
set -euo pipefail
case ${1:-} in -h | --help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."

SRC=${1:-/usr/share}
WORK=$(mktemp -d "${BENCH_DIR:-/tmp}/bench-erofs.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

if [[ -f $SRC ]]; then
  TAR=$SRC
else
  TAR=$WORK/layer.tar
  echo "creating a tar of $SRC..." >&2
  tar -C "$(dirname "$SRC")" --numeric-owner -cf "$TAR" "$(basename "$SRC")" 2>/dev/null || true
fi
EROFS_BENCH_TAR=$TAR cargo bench -q -p overlaybd-benches --bench erofs 2>&1 |
  grep -E "layer:|time:|thrpt:|^erofs/"
