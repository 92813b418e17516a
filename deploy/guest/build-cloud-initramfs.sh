#!/usr/bin/env bash
# For the boot benchmark's comparison only: Debian's cloud kernel as a guest, with an
# initramfs holding isola-guest plus the virtio modules that kernel lacks built in
# (virtio, virtio_ring, virtio_mmio, virtio_console, fuse, virtiofs). The guest loads them
# from /lib/modules/isola.load before it looks for the agent port. That kernel finds
# virtio-mmio devices only through ACPI: boot it with -M microvm,acpi=on.
#
# Usage: build-cloud-initramfs.sh [OUTPUT_DIR]   (default /usr/share/isola/guest/cloud)
# Needs: build-assets.sh run first (isola-guest and isola-vm-initramfs).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
assets="${ISOLA_GUEST_OUT:-/usr/share/isola/guest}"
out="${1:-$assets/cloud}"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
log() { echo "build-cloud-initramfs: $*" >&2; }

if ! ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1; then
    log "installing linux-image-cloud-amd64"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends linux-image-cloud-amd64 >/dev/null
fi
vmlinuz="$(ls /boot/vmlinuz-*-cloud-amd64 | sort -V | tail -n1)"
release="${vmlinuz#/boot/vmlinuz-}"
moddir="/lib/modules/$release"
[[ -f "$assets/isola-guest" ]] || { log "$assets/isola-guest missing: run build-assets.sh"; exit 1; }

mkdir -p "$out"
list="$(mktemp)"
trap 'rm -f "$list"' EXIT
adds=()
for m in virtio_ring virtio virtio_mmio virtio_console fuse virtiofs; do
    rel="$(grep -E "(^|/)$m\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | head -n1 | cut -d: -f1)"
    [[ -n "$rel" ]] || { log "module $m not found in $moddir"; exit 1; }
    guest="/lib/modules/$(basename "$rel")"
    adds+=(--add "$moddir/$rel=$guest")
    echo "$guest" >> "$list"
done
adds+=(--add "$list=/lib/modules/isola.load")
(cd "$repo" && cargo build --quiet -p isola-vm --bin isola-vm-initramfs)
"$target_dir/debug/isola-vm-initramfs" --init "$assets/isola-guest" --out "$out/initramfs.cpio" "${adds[@]}"
install -m 0644 "$vmlinuz" "$out/vmlinuz"
log "kernel $release and initramfs in $out"
