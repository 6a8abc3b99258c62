#!/usr/bin/env bash
# Runs every cargo-fuzz target for a short, fixed time; exits non-zero on the
# first crash (the crashing input is left under fuzz/artifacts/<target>/).
#
#   bash scripts/fuzz.sh [seconds per target, default 30]
#
# The machine has only the stable toolchain, and cargo-fuzz needs nightly
# flags (-Zsanitizer, -Cpasses=sancov): RUSTC_BOOTSTRAP=1 unlocks them on
# stable. AddressSanitizer stays on (cargo-fuzz's default); it builds on stable.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-30}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  # Installed into the cargo home, so later runs on the same machine skip this.
  cargo install cargo-fuzz --locked
fi

# One build for all targets: `cargo fuzz run` then finds them up to date.
cargo fuzz build
for target in $(cargo fuzz list); do
  echo "-- fuzz $target (${secs}s)"
  # The committed seeds are read from fuzz/corpus/<target>; new inputs land
  # there too and are ignored by git. -rss_limit_mb guards the 2-core CI
  # machine against a target that leaks.
  cargo fuzz run "$target" -- -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1
done
