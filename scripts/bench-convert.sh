#!/usr/bin/env bash
# Benchmark the convertor on a multi-hundred-MB image served by a loopback
# docker-registry: prints seconds per stage and MB/s (of uncompressed layer data),
# next to baselines measured in the same run on the same image:
#   * skopeo pulling the image into an OCI directory (download + verify floor) and
#     pushing it to a fresh repository (upload floor);
#   * gzip -dc of every layer (GNU gzip inflate, a familiar reference);
#   * the convertor from the local OCI layout (no registry at all);
# and TurboOCI output (--turboOCI, ext4 and --fstype erofs; both formats in one run)
# against the native conversion of the same image, with the metadata size as a
# percentage of the source layers.
# The registry runs on the same 2 cores as the convertor, so registry-side hashing
# and writes compete with conversion in the registry runs.
#
# With --baseline BIN (or BENCH_BASELINE=BIN) another convertor binary, e.g. one
# built from an older commit, converts the same image registry -> registry in
# alternation with this one (ROUNDS times, default 3, medians): the ratio of the two
# and the peak RSS of each are printed. Both push to fresh repositories every round.
# Then the two convert the image's OCI layout into a fresh copy of it, in alternation
# (no registry sharing the cores): that ratio is printed too.
#
# With --turbo only TurboOCI against native is measured: registry -> registry
# (fresh destination repositories) and OCI layout -> layout conversions of the same
# image, native, TurboOCI ext4 and TurboOCI EROFS in alternation (ROUNDS times,
# medians), with CPU seconds and the speed-up of each TurboOCI output over native.
#
# usage: scripts/bench-convert.sh [--size-mb N] [--from DIR | --synthetic] [--keep]
#                                 [--baseline BIN] [--only-baseline] [--turbo]
#   (ROUNDS, BENCH_PRIO=1: see bench-lib.sh; a session of its own at nice -20)
#   --size-mb N  uncompressed image size (default 400)
#   --from DIR   take file contents from DIR (default /usr: real binaries and text)
#   --synthetic  generated data instead (compresses and inflates much faster)
#   --keep       keep the work directory
#   --baseline BIN      compare with this convertor binary
#   --only-baseline     run only that comparison (skip skopeo, gzip, TurboOCI rows)
#   --turbo      run only the TurboOCI vs native comparison
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
. scripts/bench-lib.sh
SIZE=400; FROM=(--from /usr); KEEP=0; BASELINE=${BENCH_BASELINE:-}; ONLY=0; TURBO=0
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mb) SIZE=$2; shift 2 ;;
    --from) FROM=(--from "$2"); shift 2 ;;
    --synthetic) FROM=(); shift ;;
    --keep) KEEP=1; shift ;;
    --baseline) BASELINE=$2; shift 2 ;;
    --only-baseline) ONLY=1; shift ;;
    --turbo) TURBO=1; shift ;;
    -h | --help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for b in python3 zstd skopeo /usr/bin/docker-registry; do
  command -v "$b" >/dev/null || { echo "missing $b (scripts/deps.sh test installs it)" >&2; exit 1; }
done
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p overlaybd-convertor --bin convertor
CONV=$TARGET/release/convertor
W=$(mktemp -d /tmp/bench-convert.XXXXXX)
REG_PID=
cleanup() {
  [ -n "$REG_PID" ] && kill "$REG_PID" 2>/dev/null || true
  [ "$KEEP" = 1 ] || rm -rf "$W"
  rm -f "$BENCH_ERR"
}
trap cleanup EXIT

echo "building a ${SIZE} MB test image ..."
python3 tests/images/build.py bench "$W/img" --size-mb "$SIZE" "${FROM[@]}"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$W/reg.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $W/reg}}
http: {addr: 127.0.0.1:$PORT}
YML
/usr/bin/docker-registry serve "$W/reg.yml" >"$W/reg.log" 2>&1 &
REG_PID=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
skopeo copy --quiet --dest-tls-verify=false "oci:$W/img:bench" "docker://127.0.0.1:$PORT/bench/src:bench"

UNC=$(python3 - "$W/img" <<'PY'
import json, os, sys, gzip
root = sys.argv[1]
idx = json.load(open(os.path.join(root, "index.json")))
m = json.load(open(os.path.join(root, "blobs/sha256", idx["manifests"][0]["digest"][7:])))
comp = sum(l["size"] for l in m["layers"])
unc = 0
for l in m["layers"]:
    with gzip.open(os.path.join(root, "blobs/sha256", l["digest"][7:])) as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            unc += len(b)
print(unc, comp, len(m["layers"]))
PY
)
read -r UNC_BYTES COMP_BYTES NLAYERS <<<"$UNC"
printf "image: %d layers, %.1f MB uncompressed, %.1f MB gzip\n\n" "$NLAYERS" "$(echo "$UNC_BYTES/1000000" | bc -l)" "$(echo "$COMP_BYTES/1000000" | bc -l)"

now() { date +%s.%N; }
uptime | sed 's/^ */load: /'

# timed_conv NAME BIN ARGS...: one conversion by BIN with ARGS (its work directory
# added); wall time into NAME's samples, peak RSS (KiB) into RSS[NAME], CPU seconds
# (user + system, a figure other load on the machine hardly changes) into
# cpu_NAME's samples.
declare -A RSS=()
timed_conv() {
  local name=$1 bin=$2 s e k u sy
  shift 2
  s=$(date +%s%N)
  if ! /usr/bin/time -f "%M %U %S" -o "$W/rss.$name" "$bin" "$@" \
      -d "$W/conv.$name" >"$W/out.$name" 2>"$W/err.$name"; then
    echo "convertor '$name' ($bin) failed:" >&2
    tail -5 "$W/err.$name" >&2
    exit 1
  fi
  e=$(date +%s%N)
  rm -rf "$W/conv.$name"
  BENCH_SAMPLES[$name]+="$(((e - s) / 1000)) "
  read -r k u sy < <(tail -1 "$W/rss.$name")
  [ "${RSS[$name]:-0}" -ge "$k" ] || RSS[$name]=$k
  BENCH_SAMPLES[cpu_$name]+="$(awk -v u="$u" -v s="$sy" 'BEGIN {printf "%d", (u + s) * 1e6}') "
}
# layout_round NAME ARGS...: one OCI layout -> layout conversion with ARGS (the
# output flags).
layout_round() {
  local name=$1
  shift
  timed_conv "$name" "$CONV" -r "oci:$W/img" -i bench "$@"
}
# reg_round NAME BIN ROUND ARGS...: one registry -> registry conversion by BIN with
# ARGS (the output flags) into a fresh repository (TurboOCI mounts the source layers
# there).
reg_round() {
  local name=$1 bin=$2 r=$3
  shift 3
  timed_conv "$name" "$bin" -r "127.0.0.1:$PORT/bench/src" -i bench "$@" \
    --output-repository "127.0.0.1:$PORT/bench/$name$r" --plain
}
if [ "$TURBO" = 1 ]; then
  for r in $(seq "$ROUNDS"); do
    reg_round rnative "$CONV" "$r" -o bench_obd
    reg_round rext4 "$CONV" "$r" --turboOCI bench_ext4
    reg_round rerofs "$CONV" "$r" --turboOCI bench_erofs --fstype erofs
    layout_round native -o bench_obd
    layout_round ext4 --turboOCI bench_ext4
    layout_round erofs --turboOCI bench_erofs --fstype erofs
  done
  bench_header
  bench_row "native, registry -> registry" rnative "$UNC_BYTES"
  bench_row "--turboOCI ext4, registry -> registry" rext4 "$UNC_BYTES"
  bench_row "--turboOCI --fstype erofs, registry" rerofs "$UNC_BYTES"
  bench_row "native, OCI layout -> layout" native "$UNC_BYTES"
  bench_row "--turboOCI ext4, OCI layout -> layout" ext4 "$UNC_BYTES"
  bench_row "--turboOCI --fstype erofs, layout -> layout" erofs "$UNC_BYTES"
  printf "CPU seconds of the convertor (medians), registry: native %s, ext4 %s, erofs %s\n" \
    "$(bench_median cpu_rnative)" "$(bench_median cpu_rext4)" "$(bench_median cpu_rerofs)"
  printf "CPU seconds (medians), layout: native %s, ext4 %s, erofs %s\n" \
    "$(bench_median cpu_native)" "$(bench_median cpu_ext4)" "$(bench_median cpu_erofs)"
  printf "TurboOCI speed-up over native (wall, medians), registry -> registry: ext4 %sx, erofs %sx\n" \
    "$(bench_ratio rnative rext4)" "$(bench_ratio rnative rerofs)"
  printf "TurboOCI speed-up over native (wall, medians), layout -> layout: ext4 %sx, erofs %sx\n" \
    "$(bench_ratio native ext4)" "$(bench_ratio native erofs)"
  uptime | sed 's/^ */load after: /'
  exit 0
fi
# layout_copy_round NAME BIN: one OCI layout -> layout conversion by BIN into a fresh
# copy of the image's layout (copied before the timing starts: a layout that already
# holds the converted blobs, e.g. from the other binary's run, skips writing them).
layout_copy_round() {
  local name=$1 bin=$2
  rm -rf "$W/lay"
  cp -r "$W/img" "$W/lay"
  timed_conv "$name" "$bin" -r "oci:$W/lay" -i bench -o bench_obd
}
if [ -n "$BASELINE" ]; then
  [ -x "$BASELINE" ] || { echo "--baseline: $BASELINE is not an executable" >&2; exit 1; }
  for r in $(seq "$ROUNDS"); do
    reg_round new "$CONV" "$r" -o bench_new
    reg_round old "$BASELINE" "$r" -o bench_old
  done
  # The same comparison without a registry on the 2 cores: layout -> layout.
  for r in $(seq "$ROUNDS"); do
    layout_copy_round lnew "$CONV"
    layout_copy_round lold "$BASELINE"
  done
  rm -rf "$W/lay"
  bench_header
  bench_row "convertor registry -> registry (this tree)" new "$UNC_BYTES"
  grep '^stage' "$W/err.new" | sed 's/^/    (last run) /'
  bench_row "baseline $(basename "$BASELINE") registry -> registry" old "$UNC_BYTES"
  grep '^stage' "$W/err.old" | sed 's/^/    (last run) /' || true
  printf "speed-up over the baseline: %sx (wall, medians); CPU seconds %s vs %s (%sx)\n" \
    "$(bench_ratio old new)" "$(bench_median cpu_new)" "$(bench_median cpu_old)" "$(bench_ratio cpu_old cpu_new)"
  printf "peak RSS %d MB (baseline %d MB)\n" $((RSS[new] / 1024)) $((RSS[old] / 1024))
  bench_row "convertor OCI layout -> layout (this tree)" lnew "$UNC_BYTES"
  bench_row "baseline $(basename "$BASELINE") layout -> layout" lold "$UNC_BYTES"
  printf "speed-up over the baseline, layout -> layout: %sx (wall, medians); CPU seconds %s vs %s (%sx)\n" \
    "$(bench_ratio lold lnew)" "$(bench_median cpu_lnew)" "$(bench_median cpu_lold)" "$(bench_ratio cpu_lold cpu_lnew)"
  # Same bytes? (informational: the baseline may predate format changes)
  if cmp -s <(grep -o 'sha256:[0-9a-f]*' "$W/out.new" | sort) <(grep -o 'sha256:[0-9a-f]*' "$W/out.old" | sort); then
    echo "the two convertors printed the same digests"
  fi
  echo
  [ "$ONLY" = 1 ] && exit 0
fi
row() { awk -v n="$1" -v s="$2" -v b="$UNC_BYTES" 'BEGIN { printf "%-46s %8.2f s %8.1f MB/s\n", n, s, b / s / 1e6 }'; }

# Separate blob-info caches so skopeo cannot turn the push into cross-repo mounts.
s=$(now); HOME=$W/h1 skopeo copy --quiet --src-tls-verify=false \
  "docker://127.0.0.1:$PORT/bench/src:bench" "oci:$W/pulled:bench"; e=$(now)
row "baseline: skopeo pull to an OCI dir" "$(echo "$e - $s" | bc -l)"
s=$(now); HOME=$W/h2 skopeo copy --quiet --dest-tls-verify=false \
  "oci:$W/pulled:bench" "docker://127.0.0.1:$PORT/bench/fresh:bench"; e=$(now)
row "baseline: skopeo push of the source blobs" "$(echo "$e - $s" | bc -l)"
s=$(now); for f in "$W"/img/blobs/sha256/*; do gzip -t "$f" 2>/dev/null && gzip -dc "$f" >/dev/null; done; e=$(now)
row "baseline: gzip -dc of the layers" "$(echo "$e - $s" | bc -l)"

s=$(now)
"$CONV" -r "127.0.0.1:$PORT/bench/src" -i bench -o bench_obd --plain -d "$W/conv" >"$W/out.txt" 2>"$W/err.txt"
e=$(now)
row "convertor registry -> registry" "$(echo "$e - $s" | bc -l)"
grep '^stage' "$W/err.txt" | sed 's/^/    /'
s=$(now)
"$CONV" -r "oci:$W/img" -i bench -o bench_obd -d "$W/conv2" >"$W/out2.txt" 2>"$W/err2.txt"
e=$(now)
row "convertor OCI layout -> same layout" "$(echo "$e - $s" | bc -l)"
grep '^stage' "$W/err2.txt" | sed 's/^/    /'

# TurboOCI: the same image, registry -> registry, then from the layout for the sizes.
s=$(now)
"$CONV" -r "127.0.0.1:$PORT/bench/src" -i bench --turboOCI bench_turbo --plain -d "$W/conv3" >"$W/out3.txt" 2>"$W/err3.txt"
e=$(now)
row "convertor --turboOCI (ext4) registry -> registry" "$(echo "$e - $s" | bc -l)"
grep '^stage' "$W/err3.txt" | sed 's/^/    /'
s=$(now)
"$CONV" -r "127.0.0.1:$PORT/bench/src" -i bench --turboOCI bench_erofs --fstype erofs --plain -d "$W/conv4" >"$W/out4.txt" 2>"$W/err4.txt"
e=$(now)
row "convertor --turboOCI --fstype erofs, registry" "$(echo "$e - $s" | bc -l)"
s=$(now)
"$CONV" -r "127.0.0.1:$PORT/bench/src" -i bench --overlaybd bench_both --turboOCI bench_both_t --plain -d "$W/conv5" >"$W/out5.txt" 2>"$W/err5.txt"
e=$(now)
row "convertor --overlaybd + --turboOCI in one run" "$(echo "$e - $s" | bc -l)"
for fs in ext4 erofs; do
  "$CONV" -r "oci:$W/img" -i bench --turboOCI "bench_$fs" --fstype "$fs" -d "$W/conv6" >/dev/null 2>&1
done
python3 - "$W/img" "$COMP_BYTES" "$UNC_BYTES" <<'PY'
import json, os, sys
root, comp, unc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
idx = json.load(open(os.path.join(root, "index.json")))
for m in idx["manifests"]:
    tag = m.get("annotations", {}).get("org.opencontainers.image.ref.name")
    if tag not in ("bench_ext4", "bench_erofs"):
        continue
    man = json.load(open(os.path.join(root, "blobs/sha256", m["digest"][7:])))
    size = sum(l["size"] for l in man["layers"])
    print("TurboOCI %-5s metadata layers: %.2f MB = %.2f%% of the gzip layers, %.2f%% of the uncompressed data"
          % (tag[6:], size / 1e6, 100.0 * size / comp, 100.0 * size / unc))
PY
echo
echo "(stage seconds are summed over layers; download and upload overlap the apply of other layers)"
