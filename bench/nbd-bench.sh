#!/usr/bin/env bash
# Compares `replicator serve` with nbdkit (file plugin) and qemu-nbd on the
# same backing file, with identical fio nbd-engine jobs, one server at a time.
#
# Usage: bench/nbd-bench.sh
# Environment (all optional):
#   RUNTIME=10          seconds per fio job (time based)
#   RAMP=2              fio ramp-up seconds (not measured)
#   WARMUP=2            seconds of the same job on an earlier connection to
#                       each freshly started server, not measured (0: none)
#   FILE_SIZE=1G        backing file size
#   FIO_SIZE=896M       region fio touches (stays clear of replicator's
#                       internal metadata at the end of the file)
#   BENCH_DIR=/var/tmp/replicator-bench   where the backing file lives
#   TMPFS=1             also run everything with the file on /dev/shm
#   SERVERS="replicator nbdkit qemu-nbd"
#   JOBS="randwrite-4k-qd1 randwrite-4k-qd32 randread-4k-qd1 randread-4k-qd32 seqwrite-1m seqread-1m"
#   SKIP_DEPS=1         do not run scripts/install-deps.sh
#   REPLICATOR_ARGS=""  extra arguments for `replicator serve` (e.g. --direct-io)
#   BIN=path            replicator binary to measure (no build)
#   BASELINE_BIN=path   another replicator binary, measured side by side as
#                       server "baseline" (added to SERVERS when set), e.g.
#                       a build of the previous commit
#   ROUNDS=3            rounds; in each, every job runs on every server back
#                       to back (a fresh server per job), in the order of
#                       SERVERS in odd rounds and reversed in even ones, so a
#                       server's result is compared with the others' of the
#                       same minute, and drift on a shared machine hits every
#                       server alike
# The table shows, per job, the median over the rounds of MiB/s, IOPS,
# p99 completion latency, the ratio of MiB/s to nbdkit's, and the server's
# CPU time per request (user + system, all its threads). Below it, each
# round's own ratio to nbdkit (the two runs of a job minutes apart at most)
# and their median.
# Read jobs follow the write jobs, so every server reads the file as the
# last write job left it (the same for all servers of that round).
# Results (fio JSON, server logs, summary.txt) go to $BENCH_DIR/results-<time>/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUNTIME="${RUNTIME:-10}"
RAMP="${RAMP:-2}"
WARMUP="${WARMUP:-2}"
FILE_SIZE="${FILE_SIZE:-1G}"
FIO_SIZE="${FIO_SIZE:-896M}"
BENCH_DIR="${BENCH_DIR:-/var/tmp/replicator-bench}"
TMPFS="${TMPFS:-0}"
SERVERS="${SERVERS:-replicator nbdkit qemu-nbd}"
if [ -n "${BASELINE_BIN:-}" ] && [[ " $SERVERS " != *" baseline "* ]]; then
    SERVERS="replicator baseline ${SERVERS#replicator }"
fi
JOBS="${JOBS:-randwrite-4k-qd1 randwrite-4k-qd32 randread-4k-qd1 randread-4k-qd32 seqwrite-1m seqread-1m}"
REPLICATOR_ARGS="${REPLICATOR_ARGS:-}"
ROUNDS="${ROUNDS:-3}"

[ "${SKIP_DEPS:-0}" = 1 ] || bash scripts/install-deps.sh
[ -n "${BIN:-}" ] || cargo build --release -p replicator
BIN="${BIN:-$PWD/target/release/replicator}"

RESULTS="$BENCH_DIR/results-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RESULTS"

SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        # Give it 30 s to drain, then insist.
        for _ in $(seq 300); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Polls until a TCP port accepts connections (or the server died / 30 s passed).
wait_port() {
    local port=$1
    for _ in $(seq 300); do
        kill -0 "$SERVER_PID" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# Starts one server on $1 (file) and sets SERVER_PID and URI.
start_server() {
    local server=$1 file=$2 log=$3 port
    case "$server" in
    replicator | baseline)
        local bin=$BIN
        [ "$server" = replicator ] || bin=$BASELINE_BIN
        # shellcheck disable=SC2086
        "$bin" serve --disk "$file" --listen 127.0.0.1:0 $REPLICATOR_ARGS 2>"$log" &
        SERVER_PID=$!
        for _ in $(seq 300); do
            grep -q '^replicator: ready' "$log" && break
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        grep -q '^replicator: ready' "$log" || { echo "replicator did not start:"; cat "$log"; return 1; }
        port=$(sed -n 's/^replicator: listening nbd tcp 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$log" | head -n1)
        ;;
    nbdkit)
        port=$(free_port)
        nbdkit -f -p "$port" -i 127.0.0.1 file "$file" 2>"$log" &
        SERVER_PID=$!
        wait_port "$port" || { echo "nbdkit did not start:"; cat "$log"; return 1; }
        ;;
    qemu-nbd)
        port=$(free_port)
        qemu-nbd -t -f raw -b 127.0.0.1 -p "$port" -x volume --cache=writeback --aio=io_uring "$file" 2>"$log" &
        SERVER_PID=$!
        wait_port "$port" || { echo "qemu-nbd did not start:"; cat "$log"; return 1; }
        ;;
    *)
        echo "unknown server $server" >&2
        return 1
        ;;
    esac
    URI="nbd://127.0.0.1:$port/volume"
}

# CPU time (user + system, clock ticks) of the server so far, all its
# threads included (io_uring's kernel workers are threads of the process);
# 0 once the server is gone (fio then reports the failure).
server_cpu_ticks() {
    local stat
    stat=$(cat "/proc/$SERVER_PID/stat" 2>/dev/null) || { echo 0; return; }
    # Fields after the command name, which is in parentheses.
    echo "${stat##*) }" | awk '{ print $12 + $13 }'
}

job_args() {
    case "$1" in
    randwrite-4k-qd1) echo "--rw=randwrite --bs=4k --iodepth=1" ;;
    randwrite-4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    randread-4k-qd1) echo "--rw=randread --bs=4k --iodepth=1" ;;
    randread-4k-qd32) echo "--rw=randread --bs=4k --iodepth=32" ;;
    seqwrite-1m) echo "--rw=write --bs=1M --iodepth=8" ;;
    seqread-1m) echo "--rw=read --bs=1M --iodepth=8" ;;
    *)
        echo "unknown job $1" >&2
        return 1
        ;;
    esac
}

prepare_file() {
    local file=$1
    mkdir -p "$(dirname "$file")"
    rm -f "$file"
    # Real data everywhere, so reads are not served from holes.
    echo "filling $file ($FILE_SIZE) with random data"
    fio --name=fill --filename="$file" --rw=write --bs=1M --size="$FILE_SIZE" --ioengine=psync \
        --refill_buffers --end_fsync=1 --output=/dev/null
    "$BIN" create-md --disk "$file" --force >/dev/null
}

# run_fio JOB FIO-ARGS...: one fio run of JOB against the server at $URI.
run_fio() {
    local job=$1
    shift
    # shellcheck disable=SC2046
    fio --name="$job" --ioengine=nbd --uri="$URI" --size="$FIO_SIZE" $(job_args "$job") \
        --time_based --norandommap --randrepeat=0 --refill_buffers "$@"
}

run_suite() {
    local label=$1 file=$2 order
    prepare_file "$file"
    for round in $(seq "$ROUNDS"); do
        order=$SERVERS
        if [ $((round % 2)) = 0 ]; then
            order=$(echo "$SERVERS" | tr ' ' '\n' | tac | tr '\n' ' ')
        fi
        for job in $JOBS; do
            for server in $order; do
                echo "== $label: $job on $server (round $round of $ROUNDS)"
                local run="$RESULTS/$label-$server-$job-r$round"
                start_server "$server" "$file" "$run.log"
                if [ "$WARMUP" != 0 ]; then
                    # One unmeasured connection first: a fresh nbdkit serves
                    # its first client's 1 MiB reads at half the speed of
                    # every later one (measured, cause not traced), and a
                    # long-running server is what users have.
                    run_fio "$job" --runtime="$WARMUP" --output=/dev/null
                fi
                # Write back what earlier jobs and servers left dirty: the
                # flusher would otherwise write it (30 s after it was
                # dirtied, the default dirty_expire) in the middle of some
                # later job, on this machine's two cores.
                sync
                local cpu_before
                cpu_before=$(server_cpu_ticks)
                run_fio "$job" --runtime="$RUNTIME" --ramp_time="$RAMP" \
                    --output-format=json --output="$run.json"
                echo $(($(server_cpu_ticks) - cpu_before)) >"$run.cpu"
                stop_server
            done
        done
    done
}

run_suite disk "$BENCH_DIR/disk.img"
if [ "$TMPFS" = 1 ]; then
    run_suite tmpfs "/dev/shm/replicator-bench/disk.img"
    rm -rf /dev/shm/replicator-bench
fi

python3 - "$RESULTS" "$SERVERS" "$JOBS" "$ROUNDS" "$RAMP" "$RUNTIME" "$(getconf CLK_TCK)" <<'PY' | tee "$RESULTS/summary.txt"
import json, os, statistics, sys

results, servers, jobs = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
rounds, ramp, runtime, clk_tck = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])

def load_one(path, job):
    try:
        text = open(path).read()
    except FileNotFoundError:
        return None
    j = json.loads(text[text.index("{"):])["jobs"][0]
    side = j["read"] if "read" in job else j["write"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    # Server CPU per request: the CPU was counted over the ramp too, when
    # requests ran at about the measured rate.
    cpu_us = None
    try:
        ticks = int(open(path[: -len(".json")] + ".cpu").read())
        ops = side["iops"] * (ramp + runtime)
        cpu_us = ticks / clk_tck * 1e6 / ops if ops > 0 else None
    except (FileNotFoundError, ValueError):
        pass
    return {
        "mibs": side["bw_bytes"] / 1048576,
        "iops": side["iops"],
        "p99": pct.get("99.000000", 0) / 1000,
        "cpu_us": cpu_us,
        "err": j.get("error", 0),
    }

def load(label, server, job):
    runs = [load_one(os.path.join(results, f"{label}-{server}-{job}-r{r}.json"), job) for r in range(1, rounds + 1)]
    runs = [r for r in runs if r is not None]
    if not runs:
        return None
    return {
        "mibs": statistics.median(r["mibs"] for r in runs),
        "iops": statistics.median(r["iops"] for r in runs),
        "p99": statistics.median(r["p99"] for r in runs),
        "cpu_us": statistics.median(cpu) if (cpu := [r["cpu_us"] for r in runs if r["cpu_us"]]) else None,
        "err": max(r["err"] for r in runs),
    }

labels = sorted({f.split("-", 1)[0] for f in os.listdir(results) if f.endswith(".json")})
hdr = (
    f"{'backing':8} {'job':18} {'server':11} {'MiB/s':>9} {'IOPS':>10} {'p99 us':>10} {'vs nbdkit':>9}"
    f" {'cpu us/req':>10}"
)
print(hdr)
print("-" * len(hdr))
for label in labels:
    for job in jobs:
        base = load(label, "nbdkit", job)
        for server in servers:
            r = load(label, server, job)
            if r is None:
                continue
            ratio = f"{r['mibs'] / base['mibs']:.2f}x" if base and base["mibs"] > 0 else "-"
            err = "  (fio error)" if r["err"] else ""
            cpu = f"{r['cpu_us']:10.1f}" if r["cpu_us"] else f"{'-':>10}"
            print(
                f"{label:8} {job:18} {server:11} {r['mibs']:9.1f} {r['iops']:10.0f} {r['p99']:10.0f} {ratio:>9}"
                f" {cpu}{err}"
            )
print(f"\nmedian of {rounds} round(s); cpu us/req: the server's CPU time per request")
print("\nEach round's ratio of MiB/s to nbdkit's (same job, run back to back), and their median:")
for label in labels:
    for job in jobs:
        for server in servers:
            if server == "nbdkit":
                continue
            ratios = []
            for r in range(1, rounds + 1):
                mine = load_one(os.path.join(results, f"{label}-{server}-{job}-r{r}.json"), job)
                theirs = load_one(os.path.join(results, f"{label}-nbdkit-{job}-r{r}.json"), job)
                if mine and theirs and theirs["mibs"] > 0:
                    ratios.append(mine["mibs"] / theirs["mibs"])
            if ratios:
                each = " ".join(f"{x:.2f}" for x in ratios)
                print(f"{label:8} {job:18} {server:11} median {statistics.median(ratios):.2f}x  ({each})")
print(f"\nraw results: {results}")
PY
