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
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --release
# File I/O runs over io_uring by default where the kernel allows it; run the
# format and NBD tests again over plain pread/pwrite so both backends are covered.
OVERLAYBD_IO=pread cargo test --release -p blockdev
