# Shared by scripts/bench-*.sh (sourced, not run).
#
# Every benchmark runs its contenders in alternation, ROUNDS times (default
# 5), and reports the median of each with the spread (min-max), so that
# other load on the machine shows up as spread rather than as a wrong ratio.
#
# BENCH_PRIO=1 (root only) runs the benchmark in a session of its own whose
# scheduling group gets nice -20, for machines shared with other work: the
# kernel balances CPU between sessions, so without it a benchmark on a busy
# machine measures its share of the CPU more than the code.

ROUNDS=${ROUNDS:-5}

if [[ ${BENCH_PRIO:-0} == 1 && -z ${BENCH_PRIO_ACTIVE:-} ]]; then
  export BENCH_PRIO_ACTIVE=1
  exec setsid --wait bash -c 'echo -20 > /proc/self/autogroup 2>/dev/null || echo "BENCH_PRIO: cannot raise the priority (not root?)" >&2; exec "$0" "$@"' "$0" "$@"
fi

declare -A BENCH_SAMPLES=()

# bench_run NAME CMD...: run CMD once (output discarded), add its wall time
# in seconds to NAME's samples. Fails the benchmark if CMD fails.
bench_run() {
  local name=$1 s e
  shift
  s=$(date +%s%N)
  if ! "$@" >/dev/null 2>"$BENCH_ERR"; then
    echo "benchmark step '$name' failed: $*" >&2
    cat "$BENCH_ERR" >&2
    exit 1
  fi
  e=$(date +%s%N)
  BENCH_SAMPLES[$name]+="$(((e - s) / 1000)) "
}

# bench_median NAME: median seconds of NAME's samples.
bench_median() {
  tr ' ' '\n' <<<"${BENCH_SAMPLES[$1]}" | grep . | sort -n |
    awk '{a[NR] = $1} END {printf "%.3f", a[int((NR + 1) / 2)] / 1e6}'
}

# bench_spread NAME: "min-max" seconds of NAME's samples.
bench_spread() {
  tr ' ' '\n' <<<"${BENCH_SAMPLES[$1]}" | grep . | sort -n |
    awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.3f-%.3f", lo / 1e6, hi / 1e6}'
}

# bench_ratio A B: median(A) / median(B).
bench_ratio() {
  awk -v a="$(bench_median "$1")" -v b="$(bench_median "$2")" 'BEGIN {printf "%.2f", a / b}'
}

# bench_row LABEL NAME [BYTES]: one table line, with MB/s when BYTES is given.
bench_row() {
  local m rate=""
  m=$(bench_median "$2")
  if [[ -n ${3:-} ]]; then
    rate=$(awk -v b="$3" -v s="$m" 'BEGIN {printf "%.0f", b / s / 1e6}')
  fi
  printf "%-44s %9s %8s   %s\n" "$1" "$m" "$rate" "$(bench_spread "$2")"
}

bench_header() {
  printf "%-44s %9s %8s   %s\n" "step (median of $ROUNDS alternating runs)" "seconds" "MB/s" "spread (s)"
}

BENCH_ERR=$(mktemp)
trap 'rm -f "$BENCH_ERR"' EXIT
