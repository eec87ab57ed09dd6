#!/usr/bin/env bash
# Run every test of the project (this is what CI runs). Installs the Debian
# packages the tests drive when missing; the tests start the services they
# need themselves (docker-registry, MariaDB, NBD servers) on 127.0.0.1.
# Some tests loop-mount images and must run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh test
cargo fmt --all --check
# Lints: the [workspace.lints] table of Cargo.toml plus clippy's defaults, as errors.
# In the release profile, so the build scripts (bundled C libraries) and proc macros
# it compiles are the ones the test build below reuses.
cargo clippy --workspace --all-targets --release -- -D warnings
cargo test --workspace --release
# By default single reads and writes use pread/pwrite and batches of reads
# io_uring; run the format and NBD tests again with all file I/O over plain
# pread/pwrite and with all of it through io_uring, so every path is covered.
OVERLAYBD_IO=pread cargo test --release -p blockdev
OVERLAYBD_IO=uring cargo test --release -p blockdev
