#!/usr/bin/env bash
# The test command of README.md: installs what the tests need, then runs the
# Rust suites and the Python grpcio interop test against the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -r tests/interop/requirements.txt

cargo build --locked --bin recvault
cargo test --locked --all-targets
RECVAULT_BIN="$PWD/target/debug/recvault" python3 -m pytest -q tests/interop
