#!/usr/bin/env bash
# Run every test of the project (what CI runs). Tests start the services they
# need themselves (docker-registry, MariaDB); the system packages they use are
# listed in .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo test --workspace --release
# File I/O runs over io_uring by default where the kernel allows it; run the
# format tests again over plain pread/pwrite so both backends are covered.
OVERLAYBD_IO=pread cargo test --release -p blockdev
