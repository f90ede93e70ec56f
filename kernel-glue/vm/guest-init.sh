#!/bin/busybox sh
# /init of the kernel-glue test guest (see build-initramfs.sh). Loads the
# modules, brings up eth0 (qemu user networking: the host's NBD server is
# forwarded to 10.0.2.100:PORT), then runs the scenario named on the
# kernel command line:
#   glue.port=PORT glue.scenario=basic|restart|repl-secondary [glue.rounds=N]
# Every line for the host starts with GLUE-; the last is GLUE-RESULT.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /run/attach

dump_log() {
    [ -f /run/attach/attach.log ] && sed 's/^/GLUE-LOG /' /run/attach/attach.log
}
fail() {
    echo "GLUE-RESULT fail: $*"
    dump_log
    poweroff -f
}
ok() {
    dump_log
    echo "GLUE-RESULT ok"
}

for m in $(cat /etc/modules); do
    insmod "$m" || fail "insmod $m"
done
ip link set lo up
ip link set eth0 up || fail "no eth0"
ip addr add 10.0.2.15/24 dev eth0

param() { sed -n "s/.*glue\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
port=$(param port)
scenario=$(param scenario)
rounds=$(param rounds)
server=10.0.2.100:$port
echo "GLUE-BOOTED scenario=$scenario server=$server uptime=$(cut -d' ' -f1 /proc/uptime)"

case "$scenario" in
basic)
    dev=$(replicator attach --method kernel --nbd "$server" --export volume --timeout 10 --run-dir /run/attach) || fail attach
    echo "GLUE-DEVICE $dev"
    q=/sys/block/${dev#/dev/}/queue
    echo "GLUE-BACKEND $(cat /sys/block/${dev#/dev/}/backend)"
    echo "GLUE-QUEUE logical_block_size=$(cat $q/logical_block_size) max_sectors_kb=$(cat $q/max_sectors_kb) write_cache=$(cat $q/write_cache | tr ' ' _) fua=$(cat $q/fua)"
    mkfs.ext4 -q -F "$dev" || fail mkfs
    mount -t ext4 "$dev" /mnt || fail mount
    seq 1 200000 > /mnt/seq.txt || fail "write seq.txt"
    yes glue-data-line | head -c 16777216 > /mnt/big.txt || fail "write big.txt"
    sync /mnt/seq.txt /mnt/big.txt /mnt || fail fsync
    replicator detach "$dev" 2>&1 | sed 's/^/GLUE-DETACH-BUSY /'
    umount /mnt || fail umount
    replicator detach "$dev" || fail detach
    [ -e "/sys/block/${dev#/dev/}/pid" ] && fail "still connected after detach"
    # The same volume through the ioctl interface (the fallback for
    # kernels without nbd netlink): read back what netlink wrote, add a file.
    dev2=$(replicator attach --method kernel --kernel-ioctl --nbd-index 1 --nbd "$server" --timeout 10 --run-dir /run/attach) || fail "attach (ioctl)"
    echo "GLUE-DEVICE-IOCTL $dev2"
    mount -t ext4 "$dev2" /mnt || fail "mount (ioctl)"
    seq 1 200000 | cmp - /mnt/seq.txt || fail "read back through the ioctl path"
    seq 1 5000 > /mnt/ioctl.txt || fail "write (ioctl)"
    sync /mnt/ioctl.txt /mnt || fail "fsync (ioctl)"
    umount /mnt || fail "umount (ioctl)"
    replicator detach "$dev2" --run-dir /run/attach || fail "detach (ioctl)"
    [ -e "/sys/block/${dev2#/dev/}/pid" ] && fail "still connected after detach (ioctl)"
    # A forced detach under a mounted filesystem: later writes must fail
    # (and the host checks they never reached the volume).
    dev3=$(replicator attach --method kernel --nbd "$server" --timeout 10 --run-dir /run/attach) || fail "attach (force)"
    mount -t ext4 "$dev3" /mnt || fail "mount (force)"
    replicator detach --force "$dev3" --run-dir /run/attach || fail "forced detach"
    if seq 1 1000 > /mnt/after-force.txt && sync /mnt/after-force.txt 2>/dev/null; then
        fail "a durable write succeeded after the forced detach"
    fi
    umount /mnt 2>/dev/null || umount -l /mnt
    echo "GLUE-FORCED ok"
    ok
    ;;
restart)
    # Two connections: a restart kills both, and each comes back through
    # its own LINK_DEAD → RECONFIGURE round.
    dev=$(replicator attach --method kernel --connections 2 --nbd "$server" --export volume --timeout 5 --dead-conn-timeout 60 --run-dir /run/attach) || fail attach
    echo "GLUE-DEVICE $dev"
    mkfs.ext4 -q -F "$dev" || fail mkfs
    mount -t ext4 "$dev" /mnt || fail mount
    i=0
    while [ "$i" -lt "${rounds:-20}" ]; do
        yes "round-$i" | head -c 262144 >> /mnt/log.txt || fail "write round $i"
        # sync FILE is fsync(2), which reports write-back errors; a bare
        # sync(2) would hide them.
        sync /mnt/log.txt || fail "fsync round $i"
        echo "GLUE-ROUND $i"
        i=$((i + 1))
    done
    umount /mnt || fail umount
    replicator detach "$dev" || fail detach
    ok
    ;;
repl-secondary)
    # The secondary of a replicated resource on /dev/vda; the primary runs
    # on the host (reached through the forwarded port). Serves until the
    # host's replicator goes away after the pair was in sync, then stops
    # cleanly and writes its cache out. (The host may kill qemu instead:
    # a power cut.)
    cat > /etc/r0.toml <<EOF
[resource]
name = "r0"
protocol = "C"

[net]
tls = "plaintext-lab"
ping-interval-ms = 300
ping-timeout-ms = 1500
connect-interval-ms = 200
io-timeout-ms = 6000

[[node]]
name = "g"
id = 0
address = "10.0.2.15:7789"
disk = "/dev/vda"
nbd-listen = ["127.0.0.1:10809"]
control = "/run/r0.ctl"

[[node]]
name = "h"
id = 1
address = "$server"
disk = "/dev/vda"
nbd-listen = ["127.0.0.1:10809"]
control = "/run/r0-h.ctl"
EOF
    replicator up /etc/r0.toml --node g > /run/attach/attach.log 2>&1 &
    up=$!
    synced=0
    while kill -0 "$up" 2>/dev/null; do
        s=$(replicator status /etc/r0.toml --node g --json 2>/dev/null)
        connected=0
        case "$s" in *'"connection": "Connected"'*) connected=1 ;; esac
        if [ "$connected" = 1 ] && [ "$synced" = 0 ]; then
            case "$s" in *'"disk": "UpToDate"'*'"peer_disk": "UpToDate"'*|*'"peer_disk": "UpToDate"'*'"disk": "UpToDate"'*)
                synced=1
                echo "GLUE-INSYNC" ;;
            esac
        elif [ "$connected" = 0 ] && [ "$synced" = 1 ]; then
            break
        fi
        sleep 0.2
    done
    kill -TERM "$up" 2>/dev/null
    wait "$up"
    sync
    echo "GLUE-STOPPED"
    ok
    ;;
*)
    fail "unknown scenario '$scenario'"
    ;;
esac
poweroff -f
