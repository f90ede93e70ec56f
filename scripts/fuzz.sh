#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 20 s each).
# Installs cargo-fuzz if missing. The crate builds on the stable toolchain
# with RUSTC_BOOTSTRAP=1 (cargo-fuzz passes nightly-only sanitizer flags).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds="${1:-20}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
cd fuzz
for target in $(cargo fuzz list); do
    echo "fuzzing $target for $seconds s"
    mkdir -p "corpus/$target"
    cargo fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 2>&1 | tail -n 3
    # pipefail already fails on a crash; the artifact check names where it is.
    if compgen -G "artifacts/$target/crash-*" >/dev/null; then
        echo "fuzz target $target crashed; see fuzz/artifacts/$target" >&2
        exit 1
    fi
done
