#!/usr/bin/env bash
# Replication overhead and resync speed, in one run:
#   1. fio (nbd engine) against: `replicator serve` (standalone), a two-node
#      `replicator up` resource with protocol C and with protocol A (both
#      nodes on this machine, link over loopback), and `nbdkit file`; each
#      with the disks on tmpfs (software overhead) and on disk-backed files.
#   2. resync: the secondary disconnects, fio writes random 4 KiB blocks on
#      the primary, the secondary reconnects; prints resync MiB/s against
#      the configured maximum rate, and bytes resent against dirty bytes.
#
# Usage: bench/repl-bench.sh
# Environment (all optional):
#   RUNTIME=10 RAMP=2 ROUNDS=3      per-job seconds, ramp, rounds (medians)
#   FILE_SIZE=1G FIO_SIZE=896M      disk size, region fio touches
#   DISK_DIR=/var/tmp/replicator-repl-bench   disk-backed files
#   SHM_DIR=/dev/shm/replicator-repl-bench    tmpfs files
#   RESYNC_RATE_KIB=204800          resync rate-max for part 2
#   RESYNC_WRITE=256M               data fio writes while disconnected
#   BIN=path                        replicator binary to measure (no build)
#   BASELINE_BIN=path               another replicator binary (e.g. a build of
#                                   the previous commit), measured side by side
#                                   with protocol C as target "baseline-C"
#   SKIP_DEPS=1                     do not run scripts/install-deps.sh
#   RESYNC_ONLY=1                   only part 2
#   SKIP_RESYNC=1                   only part 1
#   SUITES="tmpfs disk"             which disk kinds part 1 runs
#   JOBS="seqwrite-1m randwrite-4k-qd32"   which fio jobs part 1 runs
#   TARGETS="standalone protocol-C protocol-A nbdkit"   what part 1 compares
#                                   (standalone and protocol-C at least)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUNTIME="${RUNTIME:-10}"
RAMP="${RAMP:-2}"
ROUNDS="${ROUNDS:-3}"
FILE_SIZE="${FILE_SIZE:-1G}"
FIO_SIZE="${FIO_SIZE:-896M}"
DISK_DIR="${DISK_DIR:-/var/tmp/replicator-repl-bench}"
SHM_DIR="${SHM_DIR:-/dev/shm/replicator-repl-bench}"
RESYNC_RATE_KIB="${RESYNC_RATE_KIB:-204800}"
RESYNC_WRITE="${RESYNC_WRITE:-256M}"
SUITES="${SUITES:-tmpfs disk}"
TARGETS="${TARGETS:-standalone protocol-C protocol-A nbdkit}"
if [ -n "${BASELINE_BIN:-}" ]; then
    case " $TARGETS " in *" baseline-C "*) ;; *) TARGETS="$TARGETS baseline-C" ;; esac
fi

[ "${SKIP_DEPS:-0}" = 1 ] || bash scripts/install-deps.sh
[ -n "${BIN:-}" ] || cargo build --release -p replicator
BIN="${BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/replicator}"
RESULTS="$DISK_DIR/results-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RESULTS"

PIDS=()
stop_all() {
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
trap stop_all EXIT

wait_ready() { # log pid
    for _ in $(seq 300); do
        grep -q '^replicator: ready' "$1" && return 0
        kill -0 "$2" 2>/dev/null || break
        sleep 0.1
    done
    echo "not ready:"; cat "$1"; return 1
}

wait_port() {
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

status_field() { # res node field
    "$BIN" status "$1" --node "$2" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['state']['$3'])"
}

wait_in_sync() { # res
    for _ in $(seq 6000); do
        if [ "$(status_field "$1" a connection)" = Connected ] && [ "$(status_field "$1" b disk)" = UpToDate ] &&
            [ "$(status_field "$1" a peer_disk)" = UpToDate ]; then
            return 0
        fi
        sleep 0.05
    done
    echo "resource did not reach sync"; return 1
}

fill() { # file
    rm -f "$1"
    fio --name=fill --filename="$1" --rw=write --bs=1M --size="$FILE_SIZE" --ioengine=psync \
        --refill_buffers --end_fsync=1 --output=/dev/null
    # Drop the fill's page cache (as fio does before every job), so the jobs
    # do not inherit its 1 MiB folios: on ext4 (Linux 6.16+) a 4 KiB write
    # into a cached large folio walks every buffer head of the folio, which
    # made each small write cost 3x more whatever server ran (BENCHMARKS.md).
    python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$1"
}

write_resource() { # dir protocol rate
    cat >"$1/r0.toml" <<EOF
[resource]
name = "r0"
protocol = "$2"
[net]
tls = "plaintext-lab"
[resync]
rate-max-kib = $3
[[node]]
name = "a"
id = 0
address = "127.0.0.1:17901"
disk = "$1/a.img"
nbd-listen = ["127.0.0.1:17911"]
control = "$1/a.ctl"
[[node]]
name = "b"
id = 1
address = "127.0.0.1:17902"
disk = "$1/b.img"
nbd-listen = ["127.0.0.1:17912"]
control = "$1/b.ctl"
EOF
}

# Starts the two nodes of $1/r0.toml; a primary, initial full sync done.
start_pair() { # dir [binary]
    local dir=$1 bin=${2:-$BIN}
    "$bin" up "$dir/r0.toml" --node b 2>"$dir/b.log" &
    PIDS+=($!)
    wait_ready "$dir/b.log" "$!"
    "$bin" up "$dir/r0.toml" --node a 2>"$dir/a.log" &
    PIDS+=($!)
    wait_ready "$dir/a.log" "$!"
    for _ in $(seq 100); do
        [ "$(status_field "$dir/r0.toml" a connection)" = Connected ] && break
        sleep 0.1
    done
    "$BIN" primary "$dir/r0.toml" --node a --force >/dev/null 2>&1
    wait_in_sync "$dir/r0.toml"
}

job_args() {
    case "$1" in
    seqwrite-1m) echo "--rw=write --bs=1M --iodepth=8" ;;
    randwrite-4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    esac
}
JOBS="${JOBS:-seqwrite-1m randwrite-4k-qd32}"

run_fio() { # uri out job
    # shellcheck disable=SC2046
    fio --name="$3" --ioengine=nbd --uri="$1" --size="$FIO_SIZE" $(job_args "$3") \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --norandommap --randrepeat=0 \
        --refill_buffers --output-format=json --output="$2"
}

iops_of() {
    python3 -c "import json,sys; j=json.load(open(sys.argv[1]))['jobs'][0]['write']; print(j['iops'], j['bw']/1024)" "$1"
}

suite() { # label dir
    local label=$1 dir=$2
    mkdir -p "$dir"
    for round in $(seq "$ROUNDS"); do
        for target in $TARGETS; do
            stop_all
            echo "== $label: $target (round $round of $ROUNDS)"
            case "$target" in
            standalone)
                fill "$dir/a.img"
                "$BIN" create-md --disk "$dir/a.img" --force >/dev/null
                "$BIN" serve --disk "$dir/a.img" --listen 127.0.0.1:0 --control "$dir/serve.ctl" 2>"$dir/serve.log" &
                PIDS+=($!)
                wait_ready "$dir/serve.log" "$!"
                port=$(sed -n 's/^replicator: listening nbd tcp 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$dir/serve.log" | head -n1)
                uri="nbd://127.0.0.1:$port/volume"
                ;;
            protocol-C | protocol-A | baseline-C)
                local bin=$BIN
                [ "$target" = baseline-C ] && bin=$BASELINE_BIN
                fill "$dir/a.img"
                fill "$dir/b.img"
                "$bin" create-md --disk "$dir/a.img" --force >/dev/null
                "$bin" create-md --disk "$dir/b.img" --force >/dev/null
                write_resource "$dir" "${target#*-}" 1024000
                start_pair "$dir" "$bin"
                uri="nbd://127.0.0.1:17911/r0"
                ;;
            nbdkit)
                fill "$dir/a.img"
                port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
                nbdkit -f -p "$port" -i 127.0.0.1 file "$dir/a.img" 2>"$dir/nbdkit.log" &
                PIDS+=($!)
                wait_port "$port"
                uri="nbd://127.0.0.1:$port/volume"
                ;;
            esac
            for job in $JOBS; do
                # Write back what earlier jobs and targets left dirty, so its
                # writeback does not throttle this job.
                sync
                run_fio "$uri" "$RESULTS/$label-$target-$job-r$round.json" "$job"
            done
        done
    done
    stop_all
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

report() { # label
    local label=$1
    for job in $JOBS; do
        declare -A value=()
        for target in standalone protocol-C protocol-A nbdkit baseline-C; do
            case " $TARGETS " in *" $target "*) ;; *) value[$target]=nan; continue ;; esac
            if [ "$job" = seqwrite-1m ]; then col=2; else col=1; fi
            value[$target]=$(for f in "$RESULTS/$label-$target-$job"-r*.json; do iops_of "$f" | cut -d' ' -f"$col"; done | median)
        done
        unit=$([ "$job" = seqwrite-1m ] && echo MiB/s || echo IOPS)
        python3 - "$label" "$job" "$unit" "${value[standalone]}" "${value[protocol-C]}" "${value[protocol-A]}" \
            "${value[nbdkit]}" "${value[baseline-C]}" <<'EOF'
import sys, math
label, job, unit, s, c, a, k, b = sys.argv[1], sys.argv[2], sys.argv[3], *map(float, sys.argv[4:])
line = (f"{label:5} {job:18} standalone {s:9.0f} {unit}  protocol C {c:9.0f} ({c/s:.2f}x standalone)"
        f"  protocol A {a:9.0f} ({a/s:.2f}x)  nbdkit {k:9.0f} (C = {c/k:.2f}x nbdkit)")
if not math.isnan(b):
    line += f"  baseline C {b:9.0f} ({b/s:.2f}x; new = {c/b:.2f}x baseline)"
print(line)
EOF
    done
}

resync_bench() {
    local dir="$DISK_DIR/resync"
    stop_all
    mkdir -p "$dir"
    fill "$dir/a.img"
    fill "$dir/b.img"
    "$BIN" create-md --disk "$dir/a.img" --force >/dev/null
    "$BIN" create-md --disk "$dir/b.img" --force >/dev/null
    write_resource "$dir" C "$RESYNC_RATE_KIB"
    start_pair "$dir"
    "$BIN" disconnect "$dir/r0.toml" --node b >/dev/null
    fio --name=dirty --ioengine=nbd --uri="nbd://127.0.0.1:17911/r0" --size="$FIO_SIZE" --rw=randwrite \
        --bs=4k --iodepth=32 --io_size="$RESYNC_WRITE" --refill_buffers --output=/dev/null
    local dirty sent_before sent
    dirty=$(status_field "$dir/r0.toml" a out_of_sync_bytes)
    sent_before=$(status_field "$dir/r0.toml" a resync_sent_bytes)
    "$BIN" connect "$dir/r0.toml" --node b >/dev/null
    wait_in_sync "$dir/r0.toml"
    sent=$(( $(status_field "$dir/r0.toml" a resync_sent_bytes) - sent_before ))
    # Time from the source's "resync started" to "resync finished" log lines
    # (the reconnect delay before it is not resync time).
    python3 - "$dirty" "$sent" "$RESYNC_RATE_KIB" "$dir/a.log" <<'EOF'
import sys, datetime, re
dirty, sent, rate_kib, log = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
stamps = {}
for line in open(log):
    for key in ("resync started as source", "resync finished"):
        if key in line:
            stamps[key] = datetime.datetime.fromisoformat(re.match(r"(\S+?)Z", line).group(1))
secs = (stamps["resync finished"] - stamps["resync started as source"]).total_seconds()
mib_s = sent / secs / 2**20
print(f"resync: {dirty/2**20:.1f} MiB dirty, {sent/2**20:.1f} MiB resent ({sent/max(dirty,1):.2f}x dirty) "
      f"in {secs:.2f} s = {mib_s:.0f} MiB/s ({mib_s*1024/rate_kib:.2f}x the configured {rate_kib/1024:.0f} MiB/s)")
EOF
    stop_all
}

if [ "${RESYNC_ONLY:-0}" = 1 ]; then
    resync_bench | tee "$RESULTS/summary.txt"
    exit 0
fi
for s in $SUITES; do
    case "$s" in
    tmpfs) suite tmpfs "$SHM_DIR" ;;
    disk) suite disk "$DISK_DIR/data" ;;
    esac
done
{
    echo "machine: $(nproc) cores, $(uname -r), $(date -u)"
    for s in $SUITES; do report "$s"; done
    [ "${SKIP_RESYNC:-0}" = 1 ] || resync_bench
} | tee "$RESULTS/summary.txt"
rm -rf "$SHM_DIR"
