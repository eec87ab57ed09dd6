#!/usr/bin/env bash
# Time overlaybd-commit on a few hundred MB of real layer data and print MB/s,
# next to baselines measured in the same run: a plain (uncompressed) commit,
# which is the I/O + compaction ceiling, and the lz4/zstd command-line tools
# compressing the same bytes as one stream.
#
# usage: scripts/bench-commit.sh [MB]   (default 300; needs a release build)
set -euo pipefail
MB=${1:-300}
cd "$(dirname "$0")/.."
cargo build --release -q -p overlaybd-tools
BIN=$PWD/target/release
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT

echo "preparing ${MB} MB of layer data from /usr ..."
tar -cf - /usr/lib /usr/share 2>/dev/null | head -c $((MB << 20)) > "$W/payload" || true
SIZE=$(stat -c %s "$W/payload")
"$BIN/overlaybd-create" -s "$W/data" "$W/index" 64 >/dev/null
# a sparse layer keeps logical byte X at file offset 4096 + X
dd if="$W/payload" of="$W/data" bs=1M oflag=seek_bytes seek=4096 conv=notrunc status=none
sync

mbps() { awk -v b="$SIZE" -v s="$1" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); awk -v a="$s" -v b="$e" 'BEGIN { print b - a }'; }

printf "%-34s %8s %8s\n" "step" "seconds" "MB/s"
row() { printf "%-34s %8.2f %8s\n" "$1" "$2" "$(mbps "$2")"; }
s=$(t "$BIN/overlaybd-commit" "$W/data" "$W/index" "$W/plain");            row "overlaybd-commit (plain, baseline)" "$s"
s=$(t "$BIN/overlaybd-commit" -z -t "$W/data" "$W/index" "$W/lz4.tar");    row "overlaybd-commit -z -t (lz4 4K)" "$s"
s=$(t "$BIN/overlaybd-commit" -z --algorithm zstd "$W/data" "$W/index" "$W/zstd"); row "overlaybd-commit -z zstd" "$s"
if command -v lz4 >/dev/null; then s=$(t lz4 -1 -f "$W/payload" "$W/p.lz4"); row "lz4 -1 CLI (stream, baseline)" "$s"; fi
if command -v zstd >/dev/null; then s=$(t zstd -3 -f -T1 "$W/payload" -o "$W/p.zst"); row "zstd -3 CLI (stream, baseline)" "$s"; fi
echo "input $((SIZE >> 20)) MiB; lz4 layer $(( $(stat -c %s "$W/lz4.tar") >> 20 )) MiB; zstd layer $(( $(stat -c %s "$W/zstd") >> 20 )) MiB"
