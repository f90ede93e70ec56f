#!/usr/bin/env bash
# The replicator alone on one machine: a two-node replicated volume
# (nodes "a" and "b", linked over loopback), the initial sync, writes with
# nbdcopy that land on both disks, a disconnect followed by a resync of only
# the changed blocks, then a crash of the primary (kill -9) and a failover
# to the secondary, which serves every byte written.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEMO="${DEMO_DIR:-/var/tmp/replicator-demo}"
SIZE="${DEMO_SIZE:-256M}"

say() {
    echo
    echo "### $*"
}

say "installing dependencies and building (release)"
bash scripts/install-deps.sh
cargo build --release -p replicator
BIN="$PWD/target/release/replicator"

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

# Waits up to 30 s for a node's readiness line.
wait_ready() {
    for _ in $(seq 300); do
        grep -q '^replicator: ready' "$1" && return 0
        sleep 0.1
    done
    echo "node failed to start:" >&2
    cat "$1" >&2
    exit 1
}

state() { # node field
    "$BIN" status "$DEMO/r0.toml" --node "$1" --json |
        python3 -c "import json,sys; print(json.load(sys.stdin)['state']['$2'])"
}

# Waits up to 120 s until both nodes are connected and UpToDate.
wait_sync() {
    for _ in $(seq 1200); do
        if [ "$(state a connection)" = Connected ] && [ "$(state a peer_disk)" = UpToDate ] &&
            [ "$(state b disk)" = UpToDate ]; then
            return 0
        fi
        sleep 0.1
    done
    echo "nodes did not reach sync" >&2
    exit 1
}

rm -rf "$DEMO"
mkdir -p "$DEMO"
say "two $SIZE disks with fresh metadata"
for n in a b; do
    truncate -s "$SIZE" "$DEMO/$n.img"
    "$BIN" create-md --disk "$DEMO/$n.img"
done
cat >"$DEMO/r0.toml" <<EOF
# One resource file, identical on both nodes.
[resource]
name = "r0"
protocol = "C"

[net]
tls = "plaintext-lab"     # a real cluster uses tls = "mutual" with a CA
ping-interval-ms = 500
ping-timeout-ms = 1000

[[node]]
name = "a"
id = 0
address = "127.0.0.1:17789"
disk = "$DEMO/a.img"
nbd-listen = ["127.0.0.1:17809"]
control = "$DEMO/a.ctl"

[[node]]
name = "b"
id = 1
address = "127.0.0.1:17790"
disk = "$DEMO/b.img"
nbd-listen = ["127.0.0.1:17810"]
control = "$DEMO/b.ctl"
EOF
cat "$DEMO/r0.toml"

say "replicator up (node a and node b)"
for n in a b; do
    "$BIN" up "$DEMO/r0.toml" --node "$n" 2>"$DEMO/$n.log" &
    PIDS+=($!)
    wait_ready "$DEMO/$n.log"
done
for _ in $(seq 100); do
    [ "$(state a connection)" = Connected ] && break
    sleep 0.1
done
"$BIN" status "$DEMO/r0.toml" --node a

say "replicator primary --force on a: the initial full sync to b"
"$BIN" primary "$DEMO/r0.toml" --node a --force
sleep 0.3
"$BIN" status "$DEMO/r0.toml" --node a
wait_sync
"$BIN" status "$DEMO/r0.toml" --node b

say "nbdinfo on the primary; the secondary refuses clients"
nbdinfo nbd://127.0.0.1:17809/r0
nbdinfo nbd://127.0.0.1:17810/r0 2>&1 | head -n1 || true

say "writing 64 MiB with nbdcopy through a (protocol C: on both disks before each reply)"
head -c 64M /dev/urandom >"$DEMO/data.bin"
nbdcopy --flush "$DEMO/data.bin" nbd://127.0.0.1:17809/r0
cmp -n 67108864 "$DEMO/data.bin" "$DEMO/a.img"
cmp -n 67108864 "$DEMO/data.bin" "$DEMO/b.img"
echo "OK: both disks hold the 64 MiB"

say "disconnect b, write 4 MiB more on a, reconnect: only those blocks are resent"
"$BIN" disconnect "$DEMO/r0.toml" --node b
head -c 4M /dev/urandom >"$DEMO/more.bin"
nbdcopy --flush "$DEMO/more.bin" "nbd://127.0.0.1:17809/r0"
echo "out of sync on a: $(state a out_of_sync_bytes) bytes"
before=$(state a resync_sent_bytes)
"$BIN" connect "$DEMO/r0.toml" --node b
wait_sync
echo "resent: $(($(state a resync_sent_bytes) - before)) bytes"
cmp -n 67108864 "$DEMO/a.img" "$DEMO/b.img"
echo "OK: replicas identical"

say "kill -9 the primary (a), promote b"
kill -KILL "${PIDS[0]}"
wait "${PIDS[0]}" 2>/dev/null || true
PIDS=("${PIDS[@]:1}")
for _ in $(seq 100); do
    [ "$(state b connection)" != Connected ] && break
    sleep 0.1
done
"$BIN" primary "$DEMO/r0.toml" --node b
"$BIN" status "$DEMO/r0.toml" --node b
nbdcopy nbd://127.0.0.1:17810/r0 "$DEMO/readback.bin"
cmp -n 4194304 "$DEMO/more.bin" "$DEMO/readback.bin"
cmp -n 62914560 -i 4194304 "$DEMO/data.bin" "$DEMO/readback.bin"
echo "OK: every byte written through a reads back from b"

say "stopping b (SIGTERM)"
kill -TERM "${PIDS[0]}"
status=0
wait "${PIDS[0]}" || status=$?
PIDS=()
echo "b exited with status $status"
[ "$status" -eq 0 ]
echo
echo "demo finished; files are in $DEMO"
