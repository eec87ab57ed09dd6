#!/usr/bin/env bash
# overlaybd-fuse throughput, as ratios measured in one run:
#   block mode: sequential (1 MiB) and random 4 KiB reads of MOUNTPOINT/disk
#     vs nbdfuse over overlaybd-nbd (the same disk through NBD + FUSE)
#     vs in-process reads of the same layer stack (no kernel in the way);
#   filesystem mode: `tar -c` of the whole tree through `overlaybd-fuse --fs`
#     vs fuse2fs on the flattened raw image (and the kernel's ext4 on a loop
#     device, when run as root).
#
#   scripts/bench-fuse.sh [LAYER...]
#
# Default stack: a converted `build.py bench` image of SIZE_MB (default 256) MB.
# Needs python3, zstd, libnbd-bin (nbdfuse), fuse2fs, fuse3. Caches are dropped
# before every fs-mode pass when run as root; file reads use O_DIRECT.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
SIZE_MB=${SIZE_MB:-256}
COUNT=${COUNT:-20000}
R="$CARGO_TARGET_DIR/release"

echo "== building (release)"
cargo build --release -q -p overlaybd-fuse --bin overlaybd-fuse --example fuse_bench
cargo build --release -q -p overlaybd-tools --bin overlaybd-nbd --bin convertor

tmp=$(mktemp -d)
nbd_pid=; fuse_nbd_pid=
cleanup() {
    set +e
    for m in "$tmp/loop" "$tmp/f2" "$tmp/fs" "$tmp/nbdmp" "$tmp/mp"; do
        if mountpoint -q "$m" 2>/dev/null; then
            fusermount -u "$m" 2>/dev/null || umount "$m" 2>/dev/null || umount -l "$m" || true
        fi
    done
    [ -n "$fuse_nbd_pid" ] && kill "$fuse_nbd_pid" 2>/dev/null
    [ -n "$nbd_pid" ] && kill "$nbd_pid" 2>/dev/null
    wait 2>/dev/null
    [ -n "${conv:-}" ] && rm -rf "$conv"
    rm -rf "$tmp"
}
trap cleanup EXIT
mkdir -p "$tmp/mp" "$tmp/nbdmp" "$tmp/fs" "$tmp/f2" "$tmp/loop"

if [ $# -eq 0 ]; then
    echo "== building and converting a ${SIZE_MB} MB image (build.py bench)"
    python3 tests/images/build.py bench "$tmp/img" --size-mb "$SIZE_MB" >/dev/null
    "$R/convertor" -r "oci:$tmp/img" -i bench -o bench_obd -d "$tmp/conv" >/dev/null 2>&1
    mapfile -t layers < <(python3 - "$tmp/img" <<'PY'
import json, os, sys
d = sys.argv[1]
for m in json.load(open(os.path.join(d, "index.json")))["manifests"]:
    if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "bench_obd":
        man = json.load(open(os.path.join(d, "blobs", *m["digest"].split(":"))))
        for l in man["layers"]:
            print(os.path.join(d, "blobs", *l["digest"].split(":")))
PY
)
else
    layers=("$@")
fi
echo "stack: ${#layers[@]} layers, $(du -cb "${layers[@]}" | tail -1 | cut -f1) bytes of blobs"

"$R/overlaybd-fuse" mount --background "${layers[@]}" "$tmp/mp" >/dev/null
"$R/overlaybd-nbd" serve "${layers[@]}" --read-only --socket "$tmp/nbd.sock" >/dev/null 2>&1 &
nbd_pid=$!
for _ in $(seq 100); do [ -S "$tmp/nbd.sock" ] && break; sleep 0.1; done
nbdfuse -r -P "$tmp/nbdfuse.pid" "$tmp/nbdmp/disk" "nbd+unix:///?socket=$tmp/nbd.sock" &
fuse_nbd_pid=$!
for _ in $(seq 100); do [ -s "$tmp/nbdfuse.pid" ] && break; sleep 0.1; done

bench() { "$R/examples/fuse_bench" read "$@" "${layers[@]}"; }
mbs() { awk '{print $1}'; }
iops() { awk '{print $3}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }

echo "== block mode: sequential 1 MiB reads of the first GiB"
s_in=$(bench seq | mbs); s_fu=$(bench seq --file "$tmp/mp/disk" | mbs)
s_nb=$(bench seq --file "$tmp/nbdmp/disk" | mbs)
printf "  in-process %8s MB/s\n  overlaybd-fuse %4s MB/s  (%s x in-process, %s x nbdfuse)\n  nbdfuse+nbd %7s MB/s\n" \
    "$s_in" "$s_fu" "$(ratio "$s_fu" "$s_in")" "$(ratio "$s_fu" "$s_nb")" "$s_nb"
for th in 1 4; do
    echo "== block mode: $COUNT random 4 KiB reads of data blocks, $th thread(s)"
    r_in=$(bench rand --count "$COUNT" --threads "$th" | iops)
    r_fu=$(bench rand --count "$COUNT" --threads "$th" --file "$tmp/mp/disk" | iops)
    r_nb=$(bench rand --count "$COUNT" --threads "$th" --file "$tmp/nbdmp/disk" | iops)
    printf "  in-process %8s IOPS\n  overlaybd-fuse %4s IOPS  (%s x in-process, %s x nbdfuse)\n  nbdfuse+nbd %7s IOPS\n" \
        "$r_in" "$r_fu" "$(ratio "$r_fu" "$r_in")" "$(ratio "$r_fu" "$r_nb")" "$r_nb"
done

echo "== filesystem mode: tar -c of the whole tree"
"$R/examples/fuse_bench" flatten "$tmp/flat.img" "${layers[@]}" >/dev/null
"$R/overlaybd-fuse" mount --background --fs "${layers[@]}" "$tmp/fs" >/dev/null
fuse2fs "$tmp/flat.img" "$tmp/f2" -o ro >/dev/null
drop() { [ "$(id -u)" = 0 ] && { sync; echo 3 > /proc/sys/vm/drop_caches; } || true; }
tarit() {
    drop
    local t0 t1 n
    t0=$(date +%s.%N)
    n=$(tar -cf - -C "$1" . 2>/dev/null | wc -c)
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" -v n="$n" 'BEGIN { printf "%.3f %d\n", b - a, n }'
}
read -r t_fs n_fs < <(tarit "$tmp/fs")
read -r t_f2 n_f2 < <(tarit "$tmp/f2")
printf "  overlaybd-fuse --fs %.3f s (%d bytes of tar)\n  fuse2fs (raw image) %.3f s  -> overlaybd-fuse takes %s x fuse2fs's time\n" \
    "$t_fs" "$n_fs" "$t_f2" "$(ratio "$t_fs" "$t_f2")"
if [ "$(id -u)" = 0 ]; then
    mount -o loop,ro "$tmp/flat.img" "$tmp/loop"
    read -r t_lo n_lo < <(tarit "$tmp/loop")
    printf "  kernel ext4 (loop)  %.3f s  -> overlaybd-fuse takes %s x the kernel's time\n" \
        "$t_lo" "$(ratio "$t_fs" "$t_lo")"
fi
