#!/usr/bin/env bash
# Installs the system packages that the end-to-end tests, the demo and the
# benchmark use, and makes sure /dev/fuse and loop devices exist.
# Idempotent: installs only what is missing, so a second run is quick.
set -euo pipefail

packages=(
    nbdkit        # baseline NBD server (tests, bench)
    libnbd-bin    # nbdinfo, nbdcopy, nbdfuse
    fio           # fio with the nbd engine
    qemu-utils    # qemu-img, qemu-io, qemu-nbd
    fuse3         # fusermount3 for nbdfuse
    e2fsprogs     # mkfs.ext4, fsck.ext4
    util-linux    # blockdev
    mount         # mount, umount, losetup
    kmod          # modprobe
    procps        # ps, /proc tools
    iproute2      # ip, ss
    iptables
    openssl
    ca-certificates
    qemu-system-x86   # kernel-glue VM tests: TCG guests with the real nbd driver
    linux-image-amd64 # the guest kernel (/boot/vmlinuz-*) and its modules
    busybox-static    # the guest's userland
    socat             # qemu guestfwd: one host connection per guest connection
    cpio              # packs the guest initramfs
    swaks                  # SMTP client for the mta tests
    testssl.sh             # TLS scan of the mta listeners (tests/tests/mta_tls_scan.rs)
    libnet-ssleay-perl     # swaks STARTTLS / implicit TLS
    libio-socket-ssl-perl  # swaks STARTTLS / implicit TLS
    dovecot-core           # doveadm reads the mta's Maildir
    mariadb-server         # the mta's MySQL directory path (a private server per test)
    mariadb-client
    postfix                # smtp-sink for the mta TLS-policy and relay tests, smtp-source for the bench
    iputils-arping         # clusterd ip resource: gratuitous ARP (arping -U)
    resource-agents        # OCF agents (ocf:heartbeat:IPaddr2) in clusterd's group tests
    psmisc                 # fuser: clusterd filesystem force_unmount
    fail2ban               # fail2ban-regex checks the mta's filter (tests/tests/mta_hardening.rs)
)
command -v python3 >/dev/null 2>&1 || packages+=(python3)

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    sudo=(sudo)
fi

missing_packages() {
    missing=()
    for p in "${packages[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$p")
        fi
    done
}

install_missing() {
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Postfix without its interactive configuration (only its tools are used).
    echo "postfix postfix/main_mailer_type select No configuration" | "${sudo[@]}" debconf-set-selections
    apt_opts=(-o DPkg::Lock::Timeout=300 -o Acquire::Retries=3)
    # An install straight after a fresh image needs package lists; refresh
    # them once, and again only if the install fails on stale lists.
    if [ ! -d /var/lib/apt/lists ] || [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit)" ]; then
        "${sudo[@]}" apt-get "${apt_opts[@]}" update -qq
    fi
    if ! "${sudo[@]}" apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${missing[@]}"; then
        "${sudo[@]}" apt-get "${apt_opts[@]}" update -qq
        "${sudo[@]}" apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${missing[@]}"
    fi
}

# Two passes: an install can remove a package of the list that conflicts
# with it (e.g. a backported qemu-utils newer than Debian's qemu-system-x86
# accepts); the second pass puts Debian's own version back.
missing_packages
if [ "${#missing[@]}" -gt 0 ]; then
    install_missing
    missing_packages
    if [ "${#missing[@]}" -gt 0 ]; then
        install_missing
    fi
else
    echo "install-deps: all packages present"
fi

# Device nodes: containers may lack them even when the kernel has the drivers.
# Failures are tolerated here; the tests that need them report it.
if [ "$(id -u)" -eq 0 ]; then
    modprobe fuse 2>/dev/null || true
    [ -e /dev/fuse ] || mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || true
    modprobe loop 2>/dev/null || true
    [ -e /dev/loop-control ] || mknod -m 0660 /dev/loop-control c 10 237 2>/dev/null || true
    for i in 0 1 2 3 4 5 6 7; do
        [ -e "/dev/loop$i" ] || mknod -m 0660 "/dev/loop$i" b 7 "$i" 2>/dev/null || true
    done
fi

for tool in nbdinfo nbdcopy nbdfuse nbdkit fio qemu-img qemu-io qemu-nbd fusermount3 losetup mkfs.ext4 python3 \
    qemu-system-x86_64 busybox socat cpio swaks doveadm mariadbd mariadb-install-db mariadb smtp-sink arping fuser; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ] && [ ! -x "/sbin/$tool" ]; then
        echo "install-deps: $tool still missing" >&2
        exit 1
    fi
done
echo "install-deps: ok"
