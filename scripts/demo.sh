#!/usr/bin/env bash
# End-to-end demonstration: build, create a 256 MiB volume, serve it over NBD,
# inspect it with nbdinfo, copy data in and out with nbdcopy, show the
# daemon's status and metrics, and shut it down cleanly.
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

SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

rm -rf "$DEMO"
mkdir -p "$DEMO"
DISK="$DEMO/disk.img"

say "creating a $SIZE volume at $DISK"
truncate -s "$SIZE" "$DISK"
"$BIN" create-md --disk "$DISK"
"$BIN" dump-md --disk "$DISK"

say "starting replicator serve"
"$BIN" serve --disk "$DISK" --listen 127.0.0.1:0 --unix "$DEMO/nbd.sock" \
    --control "$DEMO/ctl.sock" --metrics-listen 127.0.0.1:0 2>"$DEMO/serve.log" &
SERVER_PID=$!
# Poll for the readiness line, bounded to 30 s.
for _ in $(seq 300); do
    grep -q '^replicator: ready' "$DEMO/serve.log" && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
done
if ! grep -q '^replicator: ready' "$DEMO/serve.log"; then
    echo "server failed to start:" >&2
    cat "$DEMO/serve.log" >&2
    exit 1
fi
grep '^replicator: listening' "$DEMO/serve.log"
ADDR=$(sed -n 's/^replicator: listening nbd tcp \(.*\)$/\1/p' "$DEMO/serve.log" | head -n1)
METRICS=$(sed -n 's/^replicator: listening metrics \(.*\)$/\1/p' "$DEMO/serve.log" | head -n1)
URI="nbd://$ADDR/volume"

say "nbdinfo $URI"
nbdinfo "$URI"

say "writing 64 MiB of random data with nbdcopy"
head -c 64M /dev/urandom >"$DEMO/data.bin"
nbdcopy --flush "$DEMO/data.bin" "$URI"

say "reading the volume back over the Unix socket and comparing"
nbdcopy "nbd+unix:///volume?socket=$DEMO/nbd.sock" "$DEMO/readback.bin"
cmp -n "$(stat -c %s "$DEMO/data.bin")" "$DEMO/data.bin" "$DEMO/readback.bin"
echo "OK: the 64 MiB read back are identical to what was written"

say "replicator status"
"$BIN" status --control "$DEMO/ctl.sock"
"$BIN" status --control "$DEMO/ctl.sock" --json
echo

if [ -n "$METRICS" ]; then
    say "metrics (http://$METRICS/metrics)"
    python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
        "http://$METRICS/metrics" | grep -E '^replicator_io' || true
fi

say "stopping the server (SIGTERM)"
kill -TERM "$SERVER_PID"
status=0
wait "$SERVER_PID" || status=$?
SERVER_PID=""
echo "server exited with status $status"
[ "$status" -eq 0 ]
echo
echo "demo finished; files are in $DEMO"
