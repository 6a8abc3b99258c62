#!/usr/bin/env bash
# The test command of README.md: installs what the tests need, then runs the
# Rust suites and the Python grpcio interop test against the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -r tests/interop/requirements.txt
# PyYAML for the deploy/ manifest checks below.
python3 -m pip install --quiet --disable-pip-version-check "PyYAML==6.0.3"

# `failpoints` compiles the crash-test failure points into the test build
# (they stay inert unless FAILPOINTS is set); release builds have none.
# This one build also makes target/debug/recvault for the interop test: a
# separate featureless `cargo build` would fight it for that path, and the
# kill -9 tests would run a binary without the failpoints.
cargo test --locked --all-targets --features failpoints
RECVAULT_BIN="$PWD/target/debug/recvault" python3 -m pytest -q tests/interop

# A2: power-cut emulation (tests/powercut/README.md). The server runs under
# strace; crash images that keep only what was fsynced (and torn variants)
# are rebuilt from the trace and the server is started and checked on each.
# Once with the default per-stream fdatasync, then with the shared ingest
# log (fewer steady-state points: the model is the same; the log starts a
# generation after every batch, so a short run spills, checkpoints and
# deletes generations; the first checkpoint with segments to make durable
# does it with one syncfs, the path taken at many live calls, and later
# ones with a sync per segments file).
RECVAULT_BIN="$PWD/target/debug/recvault" python3 -m pytest -q tests/powercut
RECVAULT_BIN="$PWD/target/debug/recvault" POWERCUT_INGEST_SYNC=log POWERCUT_POINTS=40 FAILPOINTS="log-rotate=return;checkpoint-syncfs=1*return" \
  python3 -m pytest -q tests/powercut -k "steady or first_start"

# deploy/ (issue #6): the Kubernetes manifests and compose file parse and
# agree with each other, and their recvault.toml passes `config check`.
python3 scripts/check_deploy.py --recvault "$PWD/target/debug/recvault"

# The coaching page end to end in headless Chromium (issue #5): Debian's
# chromium driven by playwright-core (`.ci/run` installs chromium).
if [ -x "${CHROMIUM:-/usr/bin/chromium}" ] && command -v npm >/dev/null 2>&1; then
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
  RECVAULT_BIN="$PWD/target/debug/recvault" node tests/browser/coaching.mjs
else
  echo "!!! SKIPPED the coaching page browser test: needs chromium (apt-get install chromium) and Node.js/npm" >&2
fi
