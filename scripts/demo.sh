#!/usr/bin/env bash
# The appliance on this machine: three hosts as network namespaces (storage
# nodes a and b, witness w), a replicated volume with ext4, clusterd on all
# three, and the mail group (attach -> fsck + mount -> service address ->
# MTA). Mail is sent to the service address, the primary host is killed
# with SIGKILL, the survivor serves the same mailboxes, the old primary
# returns and the group moves back by plan. See tests/src/bin/demo.rs.
#
# Usage (as root): bash scripts/demo.sh
# Environment: DEMO_KEEP=1 keeps the cluster running at the end.
# For the replicator alone (two nodes over loopback): scripts/replication-demo.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "demo: run as root (network namespaces, loop devices, FUSE, ports 25/587/465)" >&2
    exit 2
fi
echo "### installing dependencies and building (release)"
bash scripts/install-deps.sh
cargo build --release --workspace --bins
exec target/release/demo
