#!/usr/bin/env bash
# Compares the `mta` with Debian's Postfix, both configured for durable
# Maildir delivery of mail to a hosted domain, with Postfix's smtp-source
# as the client; then measures the mta's memory per idle connection.
#
# Usage: bench/smtp-bench.sh            (as root; installs postfix if missing)
# Environment (all optional):
#   SESSIONS=20 MESSAGES=5000 SIZE=10240   smtp-source -s/-m/-l
#   PROBE=200            sequential messages timed by the latency probe
#   IDLE=10000           idle connections for the memory step (0 skips it)
#   BENCH_DIR=/var/tmp/mta-bench
#   SERVERS="mta postfix"
#   SKIP_DEPS=1          do not install packages
# Prints one table; details go to $BENCH_DIR/results-<time>/.
#
# Both servers fsync each message before answering 250 (Postfix always
# does; the mta's queue write is fsync + rename + directory fsync). Accept
# rate is what smtp-source sees; "all delivered" waits until every message
# is in the Maildir. p50/p99 are end-of-DATA → 250 latencies of a probe
# client running during the load. RSS is the peak sum over the server's
# processes, sampled every 100 ms.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SESSIONS="${SESSIONS:-20}"
MESSAGES="${MESSAGES:-5000}"
SIZE="${SIZE:-10240}"
PROBE="${PROBE:-200}"
IDLE="${IDLE:-10000}"
BENCH_DIR="${BENCH_DIR:-/var/tmp/mta-bench}"
SERVERS="${SERVERS:-mta postfix}"
MTA_PORT=2525
POSTFIX_PORT=2526

if [ "$(id -u)" -ne 0 ]; then
    echo "smtp-bench: run as root (Postfix is configured system-wide)" >&2
    exit 1
fi
if [ "${SKIP_DEPS:-0}" != 1 ]; then
    bash scripts/install-deps.sh
    if ! command -v postconf >/dev/null 2>&1; then
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postfix
    fi
fi
cargo build --release -p mta
target_dir="${CARGO_TARGET_DIR:-target}"
case "$target_dir" in /*) ;; *) target_dir="$PWD/$target_dir" ;; esac
MTA="$target_dir/release/mta"

RESULTS="$BENCH_DIR/results-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    postfix stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

# Peak RSS (KiB) of processes matching a pgrep pattern, until $1 disappears.
sample_rss() {
    local stopfile=$1 pattern=$2 out=$3 peak=0 sum v
    while [ ! -e "$stopfile" ]; do
        sum=0
        for p in $(pgrep -f "$pattern" || true); do
            v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
            sum=$((sum + ${v:-0}))
        done
        [ "$sum" -gt "$peak" ] && peak=$sum
        sleep 0.1
    done
    echo "$peak" >"$out"
}

# The latency probe: sequential messages, prints p50 and p99 in ms.
probe() {
    python3 - "$1" "$PROBE" <<'PY'
import smtplib, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
s = smtplib.SMTP("127.0.0.1", port, timeout=60)
s.ehlo("probe.test")
lat = []
body = "From: probe@remote.example\r\nSubject: probe\r\n\r\n" + ("x" * 98 + "\r\n") * 10
for i in range(n):
    s.mail("probe@remote.example"); s.rcpt("alice@example.org")
    code, _ = s.docmd("DATA")
    assert code == 354, code
    s.send((body + ".\r\n").encode())
    t = time.monotonic()
    code, _ = s.getreply()
    lat.append((time.monotonic() - t) * 1000)
    assert code == 250, code
s.quit()
lat.sort()
print("%.1f %.1f" % (lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]))
PY
}

count_mail() {
    find "$1" -path '*/new/*' -type f 2>/dev/null | wc -l
}

# Runs smtp-source and the probe against PORT; waits for DELIVERED_DIR to
# hold every message. Prints "accept_rate delivered_rate p50 p99".
load() {
    local name=$1 port=$2 maildirs=$3 pattern=$4
    local expected=$((MESSAGES + PROBE))
    rm -f "$RESULTS/$name.stop"
    sample_rss "$RESULTS/$name.stop" "$pattern" "$RESULTS/$name.rss" &
    local sampler=$!
    local start end
    start=$(date +%s.%N)
    probe "$port" >"$RESULTS/$name.probe" &
    local prober=$!
    /usr/sbin/smtp-source -s "$SESSIONS" -m "$MESSAGES" -l "$SIZE" -d \
        -f sender@remote.example -t alice@example.org "127.0.0.1:$port" >"$RESULTS/$name.source" 2>&1
    end=$(date +%s.%N)
    if ! wait "$prober"; then
        echo "$name: the latency probe failed" >&2
        return 1
    fi
    local deadline=$((SECONDS + 600))
    while [ "$(count_mail "$maildirs")" -lt "$expected" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    local delivered_end
    delivered_end=$(date +%s.%N)
    touch "$RESULTS/$name.stop"
    wait "$sampler"
    local got
    got=$(count_mail "$maildirs")
    echo "$name: $got of $expected messages delivered" >>"$SUMMARY"
    awk -v s="$start" -v e="$end" -v d="$delivered_end" -v m="$MESSAGES" -v n="$expected" -v lat="$(cat "$RESULTS/$name.probe")" \
        -v rss="$(cat "$RESULTS/$name.rss")" \
        'BEGIN { printf "%-8s %10.0f %14.0f %8s %8s %10d\n", "'"$name"'", m / (e - s), n / (d - s), substr(lat, 1, index(lat, " ") - 1), substr(lat, index(lat, " ") + 1), rss }'
}

bench_mta() {
    local dir="$BENCH_DIR/mta"
    rm -rf "$dir"
    mkdir -p "$dir/data"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$dir/key.pem" -out "$dir/cert.pem" -days 1 -subj /CN=localhost 2>/dev/null
    cat >"$dir/mta.toml" <<TOML
hostname = "mx.example.org"
data_dir = "$dir/data"
connections_max = $((IDLE + 100))
connections_per_ip_max = $((IDLE + 100))
[tls]
cert = "$dir/cert.pem"
key = "$dir/key.pem"
[[listener]]
kind = "mx"
address = "127.0.0.1:$MTA_PORT"
[privileges]
allow_root = true
TOML
    "$MTA" -c "$dir/mta.toml" domain add example.org >/dev/null
    echo "bench-pw" | "$MTA" -c "$dir/mta.toml" user add alice@example.org >/dev/null
    ulimit -n $((IDLE + 1000))
    RUST_LOG=warn "$MTA" -c "$dir/mta.toml" serve 2>"$RESULTS/mta.log" &
    local pid=$!
    pids+=("$pid")
    local deadline=$((SECONDS + 30))
    until grep -q "mta: ready" "$RESULTS/mta.log"; do
        [ $SECONDS -lt $deadline ] || { echo "mta did not start" >&2; cat "$RESULTS/mta.log" >&2; exit 1; }
        sleep 0.1
    done
    load mta "$MTA_PORT" "$dir/data/mailboxes" "$MTA -c $dir/mta.toml serve"
    if [ "$IDLE" -gt 0 ]; then
        idle_memory "$pid" "$MTA_PORT"
    fi
    kill "$pid"
    wait "$pid" || true
}

# Opens $IDLE connections that read the greeting and stay silent; reports
# the RSS growth per connection.
idle_memory() {
    local pid=$1 port=$2 before after
    before=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
    python3 - "$port" "$IDLE" "$pid" >"$RESULTS/idle.txt" <<'PY'
import resource, socket, sys, time
port, n, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 1000, n + 1000))
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    socks.append(s)
for s in socks:
    s.recv(512)
rss = [l for l in open("/proc/%s/status" % pid) if l.startswith("VmRSS:")][0].split()[1]
print(len(socks), rss)
PY
    after=$(awk '{print $2}' "$RESULTS/idle.txt")
    echo "mta idle connections: $IDLE, RSS $before KiB -> $after KiB, $(( (after - before) * 1024 / IDLE )) bytes per connection"
}

bench_postfix() {
    local dir="$BENCH_DIR/postfix"
    rm -rf "$dir"
    mkdir -p "$dir/mail"
    chown nobody:nogroup "$dir/mail"
    postfix stop >/dev/null 2>&1 || true
    # Debian's "No configuration" install leaves no main.cf.
    [ -f /etc/postfix/main.cf ] || cp /usr/share/postfix/main.cf.debian /etc/postfix/main.cf
    echo "alice@example.org example.org/alice/" >"$dir/vmailbox"
    postmap "$dir/vmailbox"
    postconf -e \
        "myhostname = mx.example.org" "mydestination =" "mynetworks =" "inet_interfaces = 127.0.0.1" \
        "relay_domains =" "smtpd_relay_restrictions = reject_unauth_destination" \
        "smtpd_recipient_restrictions = reject_unauth_destination" \
        "virtual_mailbox_domains = example.org" "virtual_mailbox_maps = hash:$dir/vmailbox" \
        "virtual_mailbox_base = $dir/mail" "virtual_uid_maps = static:65534" "virtual_gid_maps = static:65534" \
        "smtpd_forbid_bare_newline = normalize" "smtpd_forbid_unauth_pipelining = yes" \
        "maillog_file = $RESULTS/postfix.log" "compatibility_level = 3.6" "alias_maps =" "alias_database =" \
        "smtputf8_enable = yes"
    postconf -M "smtp/inet=127.0.0.1:$POSTFIX_PORT inet n - n - - smtpd"
    postfix start >/dev/null 2>&1 || postfix reload
    sleep 1
    # Postfix children run with argv[0] = their service name.
    load postfix "$POSTFIX_PORT" "$dir/mail" '^(/usr/lib/postfix/sbin/master|smtpd|cleanup|qmgr|virtual|trivial-rewrite|pickup|anvil|proxymap|tlsmgr|scache)( |$)'

    postfix stop >/dev/null 2>&1 || true
}

{
    echo "smtp-source: $SESSIONS sessions, $MESSAGES messages of $SIZE bytes; probe $PROBE messages"
    printf "%-8s %10s %14s %8s %8s %10s\n" server "accepted/s" "all delivered/s" "p50 ms" "p99 ms" "peak RSS KiB"
} | tee "$SUMMARY"
for s in $SERVERS; do
    "bench_$s" | tee -a "$SUMMARY"
done
echo "details: $RESULTS"
