#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of untrusted bytes (cargo-fuzz,
# libFuzzer). The same entry points run briefly in the normal test suite
# (crates/fuzzing/tests/deterministic.rs); this runs them for longer.
#
#   scripts/fuzz.sh [SECONDS]           every target, one after another, SECONDS each (default 60)
#   scripts/fuzz.sh TARGET [SECONDS]    one target
#   scripts/fuzz.sh seeds               regenerate fuzz/seeds/ (small committed seeds)
#   scripts/fuzz.sh list                the targets
#
# Each target starts from fuzz/seeds/<target>/ (tar_apply from tar_reader's)
# and keeps what it finds in fuzz/corpus/<target>/ (not committed). Runs use
# one job (-jobs=1 -workers=1): the machine is shared. A crash leaves its
# input in fuzz/artifacts/<target>/; fix it, then keep the input as a
# regression test: copy it to fuzz/regressions/<target>/ (the test suite runs
# every file there). Needs the nightly toolchain (rustup) and cargo-fuzz
# (installed with `cargo install cargo-fuzz --locked` when missing).
set -euo pipefail
case ${1:-} in -h | --help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGETS=(nbd_request tar_reader tar_apply zfile lsmt_sealed lsmt_writable tar_wrapper config_json erofs_image gzip_index oci_manifest www_authenticate docker_config turbo_layer)
FIXTURES=${OVERLAYBD_FIXTURES:-}
if [[ -z $FIXTURES ]]; then
    for d in "$ROOT/../shared/fixtures/overlaybd-reference" /work/shared/fixtures/overlaybd-reference; do
        [[ -f $d/README.md ]] && FIXTURES=$d && break
    done
fi

seeds() {
    rm -rf fuzz/seeds.new
    cargo run --release -q -p overlaybd-fuzzing --example make_seeds -- "$ROOT/fuzz/seeds.new"
    python3 fuzz/make-tar-seeds.py fuzz/seeds.new/tar_reader ${FIXTURES:+"$FIXTURES"}
    rm -rf fuzz/seeds
    mv fuzz/seeds.new fuzz/seeds
    find fuzz/seeds -type f | sort | xargs ls -l
}

need_tools() {
    rustup toolchain list | grep -q '^nightly' || {
        echo "fuzz.sh: the nightly toolchain is needed: rustup toolchain install nightly" >&2
        exit 1
    }
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
}

# run TARGET SECONDS: prints "TARGET RUNS EXEC/S" on success.
run() {
    local t=$1 secs=$2 seed=$1
    [[ $t == tar_apply ]] && seed=tar_reader
    mkdir -p "fuzz/corpus/$t"
    cp -n "fuzz/seeds/$seed"/* "fuzz/corpus/$t/" 2>/dev/null || true
    local log="fuzz/artifacts/$t.log"
    mkdir -p "fuzz/artifacts/$t"
    echo "== $t: $secs s" >&2
    # Inputs up to 64 KiB (256 KiB for the image targets, whose seeds are
    # a whole small image): larger inputs only slow the search down. 2 GiB
    # RSS limit, 10 s per input.
    local max_len=65536
    [[ $t == erofs_image || $t == gzip_index ]] && max_len=262144
    if ! (cd fuzz && cargo +nightly fuzz run -O "$t" "corpus/$t" -- \
        -max_total_time="$secs" -jobs=1 -workers=1 -max_len="$max_len" \
        -rss_limit_mb=2048 -timeout=10 -print_final_stats=1) >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "fuzz.sh: $t FAILED; the input is in fuzz/artifacts/$t/ (log: $log)" >&2
        return 1
    fi
    local runs rate
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    echo "$t ${runs:-?} ${rate:-?}"
}

case "${1:-}" in
seeds) seeds ;;
list) printf '%s\n' "${TARGETS[@]}" ;;
"" | [0-9]*)
    need_tools
    secs=${1:-60}
    (cd fuzz && cargo +nightly fuzz build -O)
    summary=()
    failed=0
    for t in "${TARGETS[@]}"; do
        if line=$(run "$t" "$secs"); then summary+=("$line"); else summary+=("$t FAILED -"); failed=1; fi
    done
    printf '\n%-14s %14s %10s\n' target executions exec/s
    for l in "${summary[@]}"; do printf '%-14s %14s %10s\n' $l; done
    exit $failed
    ;;
*)
    t=$1
    [[ " ${TARGETS[*]} " == *" $t "* ]] || { echo "fuzz.sh: unknown target $t (try: scripts/fuzz.sh list, or --help)" >&2; exit 2; }
    need_tools
    line=$(run "$t" "${2:-60}")
    printf '%-14s %14s %10s\n' target executions exec/s
    printf '%-14s %14s %10s\n' $line
    ;;
esac
