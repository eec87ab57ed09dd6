#!/usr/bin/env bash
# overlaybd-fuse throughput, as ratios measured in one run:
#   block mode: sequential (1 MiB) and random 4 KiB reads of MOUNTPOINT/disk
#     vs nbdfuse over overlaybd-nbd (the same disk through NBD + FUSE)
#     vs in-process reads of the same layer stack (no kernel in the way);
#   filesystem mode: `tar -c` of the whole tree through `overlaybd-fuse --fs`
#     vs fuse2fs on the flattened raw image (and the kernel's ext4 on a loop
#     device, when run as root);
#   lazy mode (default image only; needs docker-registry and skopeo): the
#     converted image in a local docker-registry, mounted by reference:
#     time to the first file (mount + read one small file) cold and with a
#     warm --cache-dir, and `tar -c` of the whole tree, vs pulling the whole
#     image (skopeo copy); bytes fetched from the daemon's counters. A local
#     registry has no network latency: over a real network the ratios favour
#     lazy mode more for the first file and less for the whole tree.
#
#   scripts/bench-fuse.sh [LAYER...]
#
# Default stack: a converted `build.py bench` image of SIZE_MB (default 256) MB.
# Needs python3, zstd, libnbd-bin (nbdfuse), fuse2fs, fuse3. Caches are dropped
# before every fs-mode pass when run as root; file reads use O_DIRECT.
set -euo pipefail
case ${1:-} in -h | --help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
SIZE_MB=${SIZE_MB:-256}
COUNT=${COUNT:-20000}
R="$CARGO_TARGET_DIR/release"

echo "== building (release)"
cargo build --release -q -p overlaybd-fuse --bin overlaybd-fuse --example fuse_bench
cargo build --release -q -p overlaybd-tools --bin overlaybd-nbd
cargo build --release -q -p overlaybd-convertor --bin convertor

tmp=$(mktemp -d)
nbd_pid=; fuse_nbd_pid=
cleanup() {
    set +e
    for m in "$tmp/loop" "$tmp/f2" "$tmp/fs" "$tmp/nbdmp" "$tmp/mp" "$tmp/lazy"; do
        if mountpoint -q "$m" 2>/dev/null; then
            fusermount -u "$m" 2>/dev/null || umount "$m" 2>/dev/null || umount -l "$m" || true
        fi
    done
    [ -n "$fuse_nbd_pid" ] && kill "$fuse_nbd_pid" 2>/dev/null
    [ -n "$nbd_pid" ] && kill "$nbd_pid" 2>/dev/null
    [ -n "${reg_pid:-}" ] && kill "$reg_pid" 2>/dev/null
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

if [ $# -ne 0 ] || ! command -v docker-registry >/dev/null || ! command -v skopeo >/dev/null; then
    echo "== lazy mode: skipped (needs the default image, docker-registry and skopeo)"
    exit 0
fi
echo "== lazy mode: the image in a local docker-registry"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$tmp/reg" "$tmp/lazy"
printf 'version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$tmp/reg/data" "$port" > "$tmp/reg/config.yml"
docker-registry serve "$tmp/reg/config.yml" >"$tmp/reg/log" 2>&1 &
reg_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
ref="127.0.0.1:$port/bench:bench_obd"
# The source image pushed as is, converted in the registry (as in the tests).
skopeo copy --quiet --preserve-digests --dest-tls-verify=false "oci:$tmp/img:bench" \
    "docker://127.0.0.1:$port/bench:bench"
"$R/convertor" -r "127.0.0.1:$port/bench" -i bench -o bench_obd --plain -d "$tmp/conv-reg" >/dev/null 2>&1
image_bytes=$(du -cb "${layers[@]}" | tail -1 | cut -f1)
# The smallest file of the top layer's directory (chosen before timing).
first=$(python3 tests/images/build.py tree "$tmp/img" bench | python3 -c '
import json, sys
t = json.load(sys.stdin)
f = [(v["size"], k) for k, v in t.items() if v["type"] == "file" and v["size"] > 0]
print(min(f)[1])')
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
fetched() { # the daemon's running total of blob bytes fetched (0 if none)
    { grep -o '([0-9]* bytes in [0-9]* requests so far)' "$1" || echo "(0 bytes"; } |
        tail -1 | tr -d '(' | awk '{print $1}'
}
lazy_pid=
lazy_mount() { # LOG CACHE_DIR
    lazy_pid=$(OVERLAYBD_LOG=info "$R/overlaybd-fuse" mount --background --fs --plain \
        --log "$1" --cache-dir "$2" "$ref" "$tmp/lazy" | sed -n 's/.*daemon pid \([0-9]*\).*/\1/p')
}
lazy_umount() { # and wait for the daemon to release its cache directory
    fusermount -u "$tmp/lazy"
    for _ in $(seq 200); do
        grep -qs '^State:[[:space:]]*[RSD]' "/proc/$lazy_pid/status" || break # gone, or a zombie
        sleep 0.05
    done
}
drop
t0=$(now)
skopeo copy --quiet --src-tls-verify=false "docker://$ref" "oci:$tmp/pulled:x"
t_pull=$(since "$t0")
rm -rf "$tmp/pulled"
# The least a pull does: download every layer blob (to /dev/null).
drop
t0=$(now)
for l in "${layers[@]}"; do
    curl -sf -o /dev/null "http://127.0.0.1:$port/v2/bench/blobs/sha256:$(basename "$l")"
done
t_get=$(since "$t0")
drop
t0=$(now); lazy_mount "$tmp/cold.log" "$tmp/cache1"; cat "$tmp/lazy/$first" >/dev/null
t_cold=$(since "$t0"); b_cold=$(fetched "$tmp/cold.log")
lazy_umount
drop
t0=$(now); lazy_mount "$tmp/warm.log" "$tmp/cache1"; cat "$tmp/lazy/$first" >/dev/null
t_warm=$(since "$t0"); b_warm=$(fetched "$tmp/warm.log")
lazy_umount
drop
t0=$(now); lazy_mount "$tmp/all.log" "$tmp/cache2"; n_all=$(tar -cf - -C "$tmp/lazy" . 2>/dev/null | wc -c)
t_all=$(since "$t0"); b_all=$(fetched "$tmp/all.log")
lazy_umount
printf "  full pull (skopeo copy, %d bytes of layers)  %.3f s; the layer blobs alone (curl) %.3f s\n" \
    "$image_bytes" "$t_pull" "$t_get"
printf "  first file, cold: mount + cat %s  %.3f s, %d bytes fetched (%s%% of the image)  -> %s x the pull's time\n" \
    "$first" "$t_cold" "$b_cold" "$(awk -v a="$b_cold" -v b="$image_bytes" 'BEGIN { printf "%.1f", 100 * a / b }')" "$(ratio "$t_cold" "$t_pull")"
printf "  first file, warm --cache-dir        %.3f s, %d bytes fetched  -> %s x the pull's time\n" \
    "$t_warm" "$b_warm" "$(ratio "$t_warm" "$t_pull")"
printf "  whole tree, cold: mount + tar -c    %.3f s, %d bytes fetched (%d bytes of tar)  -> %s x the pull's time\n" \
    "$t_all" "$b_all" "$n_all" "$(ratio "$t_all" "$t_pull")"
printf "  (the blobs alone: first file cold %s x, whole tree %s x their download time)\n" \
    "$(ratio "$t_cold" "$t_get")" "$(ratio "$t_all" "$t_get")"
