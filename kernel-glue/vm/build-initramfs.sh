#!/usr/bin/env bash
# Builds a small initramfs for a qemu guest that tests kernel-glue against
# the real kernel nbd driver: busybox-static, the modules nbd and ext4 and
# virtio-net need (from /lib/modules of the host's Debian kernel package),
# mkfs.ext4, our binaries with their ldd libraries, and guest-init.sh as
# /init.
#
# usage: build-initramfs.sh OUT.cpio.gz KERNEL_VERSION BINARY...
# The base of the Vagrant/VM lab: the same image boots any scenario that
# guest-init.sh knows, chosen on the kernel command line.
set -euo pipefail

out=$1
kver=$2
shift 2
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
moddir="/lib/modules/$kver"
[ -d "$moddir" ] || { echo "build-initramfs: $moddir missing (apt-get install linux-image-amd64)" >&2; exit 1; }
busybox=$(command -v busybox || echo /bin/busybox)
if [ ! -x "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
    echo "build-initramfs: a static busybox is needed (apt-get install busybox-static)" >&2
    exit 1
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,mnt,lib/modules,etc,run}
cp "$busybox" "$root/bin/busybox"

# Copies an executable and the shared libraries ldd lists for it.
copy_with_libs() {
    local src=$1 dst=$2
    mkdir -p "$(dirname "$root$dst")"
    cp -L "$src" "$root$dst"
    ldd "$src" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
        [ -e "$lib" ] || continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L -n "$lib" "$root$lib"
    done
}

for b in "$@"; do
    copy_with_libs "$b" "/bin/$(basename "$b")"
    # Debug builds carry hundreds of MiB of symbols; the guest needs none.
    if command -v strip >/dev/null 2>&1; then
        strip "$root/bin/$(basename "$b")"
    fi
done
copy_with_libs "$(command -v mkfs.ext4 || echo /sbin/mkfs.ext4)" /sbin/mkfs.ext4

# Modules in dependency order, from modules.dep (deps first). ext4 needs
# crc32c only as a soft dependency, so it is named explicitly.
declare -A seen=()
order=()
resolve() {
    local name=${1//-/_} line path dep
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    line=$(awk -v n="$name" -F: '{ f = $1; sub(".*/", "", f); sub("\\.ko.*", "", f); gsub("-", "_", f); if (f == n) { print; exit } }' "$moddir/modules.dep")
    if [ -z "$line" ]; then
        # Built into the kernel, or absent: the guest will tell.
        grep -q "/${1}.ko" "$moddir/modules.builtin" 2>/dev/null || echo "build-initramfs: module $1 not found (built in?)" >&2
        return 0
    fi
    path=${line%%:*}
    for dep in ${line#*:}; do
        dep=${dep##*/}
        resolve "${dep%%.ko*}"
    done
    order+=("$path")
}
for m in crc32c_generic libcrc32c crc16 mbcache jbd2 ext4 nbd virtio_pci virtio_net virtio_blk; do
    resolve "$m"
done
: > "$root/etc/modules"
for p in "${order[@]}"; do
    f="$root/lib/modules/$(basename "$p")"
    case "$p" in
        *.ko.xz) xz -dc "$moddir/$p" > "${f%.xz}"; f=${f%.xz} ;;
        *.ko.zst) zstd -qdc "$moddir/$p" > "${f%.zst}"; f=${f%.zst} ;;
        *) cp "$moddir/$p" "$f" ;;
    esac
    echo "/lib/modules/$(basename "$f")" >> "$root/etc/modules"
done

cp "$here/guest-init.sh" "$root/init"
chmod 755 "$root/init"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 > "$out"
echo "build-initramfs: $out ($(du -h "$out" | cut -f1), ${#order[@]} modules)"
