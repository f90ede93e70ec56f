#!/usr/bin/env bash
# clusterd failover time: death of the primary host (its link down and every
# process killed at once) and a cut of its network, RUNS times each (default 10), on three network-namespace hosts;
# prints median and max next to Heartbeat's and Corosync's default failure
# detection times. Needs root. See tests/src/bin/failover-bench.rs.
#
# Usage: bench/failover-bench.sh
# Environment: RUNS=10, SKIP_DEPS=1 (do not run scripts/install-deps.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ "${SKIP_DEPS:-0}" = 1 ] || bash scripts/install-deps.sh
cargo build --release --workspace --bins
exec target/release/failover-bench
