#!/usr/bin/env bash
# Run every test of the project (this is what CI runs). Installs the Debian
# packages the tests drive when missing; the tests start the services they
# need themselves (docker-registry, MariaDB, NBD servers) on 127.0.0.1.
# Some tests loop-mount images and must run as root.
set -euo pipefail
case ${1:-} in
  -h | --help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
  "") ;;
  *) echo "usage: scripts/test.sh   (no arguments; --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
scripts/deps.sh test
cargo fmt --all --check
# Lints: the [workspace.lints] table of Cargo.toml plus clippy's defaults, as errors.
# In the release profile, so the build scripts (bundled C libraries) and proc macros
# it compiles are the ones the test build below reuses.
cargo clippy --workspace --all-targets --release -- -D warnings
# The API docs build without broken or private intra-doc links (release profile for
# the same reason).
RUSTDOCFLAGS="${RUSTDOCFLAGS:-} -D warnings" cargo doc --workspace --no-deps --release
cargo test --workspace --release
# By default single reads and writes use pread/pwrite and batches of reads
# io_uring; run the format and NBD tests again with all file I/O over plain
# pread/pwrite and with all of it through io_uring, so every path is covered.
# These are the test binaries the workspace run just built: `cargo test -p
# blockdev` would resolve features for blockdev alone and rebuild its
# dependencies (about a minute).
mapfile -t BLOCKDEV_TESTS < <(cargo test --workspace --release --no-run --message-format=json |
    jq -r 'select(.reason == "compiler-artifact" and .profile.test and .executable != null
                  and (.package_id | test("/blockdev#"))) | .executable')
[ "${#BLOCKDEV_TESTS[@]}" -gt 0 ] || { echo "test.sh: no blockdev test binaries found" >&2; exit 1; }
for io in pread uring; do
    for t in "${BLOCKDEV_TESTS[@]}"; do
        echo "== OVERLAYBD_IO=$io ${t##*/}"
        (cd blockdev && OVERLAYBD_IO=$io "$t" -q)
    done
done
