#!/usr/bin/env bash
# Boots the kernel-glue test guest under qemu TCG (KVM guests hang on the
# CI machines) with the host's Debian kernel and an initramfs from
# build-initramfs.sh. The guest's only way out is qemu user networking
# restricted to one forwarded address: 10.0.2.100:PORT in the guest is
# 127.0.0.1:PORT on the host, one socat per connection (a chardev target
# would be connected once, at start-up, and never again after a server
# restart).
#
# usage: run-guest.sh KERNEL_VERSION INITRD PORT SCENARIO [KERNEL_ARG...]
# The serial console is stdout; the guest powers off when done.
# GUEST_DISK=FILE gives the guest a raw virtio disk (/dev/vda) cached by the
# host, so a killed qemu loses only what the guest had not written out.
set -euo pipefail
kver=$1
initrd=$2
port=$3
scenario=$4
shift 4
disk=()
if [ -n "${GUEST_DISK:-}" ]; then
    disk=(-drive "file=$GUEST_DISK,if=virtio,format=raw,cache=writeback")
fi
exec qemu-system-x86_64 \
    -accel tcg -m 512 -smp 1 \
    -nographic -no-reboot -nodefaults -serial stdio \
    -kernel "/boot/vmlinuz-$kver" -initrd "$initrd" \
    -append "console=ttyS0 quiet panic=-1 glue.port=$port glue.scenario=$scenario $*" \
    -netdev "user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:$port-cmd:socat STDIO TCP:127.0.0.1:$port" \
    -device virtio-net-pci,netdev=n0,romfile= \
    "${disk[@]}"
