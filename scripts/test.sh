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

step "cargo test"
cargo test --workspace --no-fail-fast

echo
echo "==> all checks passed in $((SECONDS - start)) s"
