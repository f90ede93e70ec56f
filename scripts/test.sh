#!/usr/bin/env bash
# The project's test command: dependencies, formatting, lints, build, tests.
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

start=$SECONDS
step() {
    echo
    echo "==> $* (at $((SECONDS - start)) s)"
}

step "install system dependencies"
bash scripts/install-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

# The end-to-end tests run target/debug/replicator, which `cargo test` alone
# does not rebuild.
step "cargo build"
cargo build --workspace --bins

step "fuzz smoke run (${FUZZ_SECONDS:-20} s per target)"
bash scripts/fuzz.sh "${FUZZ_SECONDS:-20}"

step "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "\n==> finished in %d s\ntests: %d passed, %d failed, %d skipped\n", '"$((SECONDS - start))"', p, f, s }' "$log"
exit "$status"
