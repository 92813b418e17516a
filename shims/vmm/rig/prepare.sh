#!/usr/bin/env bash
# Installs what the nested KVM rig (shims/vmm/tests/nested.rs) needs on a Debian 12 host:
# QEMU (TCG, -cpu max emulates AMD SVM with nested paging), Debian's cloud kernel for L1
# (it ships kvm.ko, kvm-amd.ko, irqbypass.ko, tun.ko), busybox-static for L1's shell,
# cpio and e2fsprogs to build L1's initramfs and the test disk; then the isola guest
# kernel and initramfs that L2 boots (deploy/guest/build-assets.sh, cached).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || need+=(linux-image-cloud-amd64)
if ((${#need[@]})); then
    echo "rig/prepare.sh: installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
fi
guest="${ISOLA_GUEST_DIR:-/usr/share/isola/guest}"
have_virtiofsd() { command -v virtiofsd >/dev/null || [[ -x /usr/local/bin/virtiofsd ]]; }
if [[ ! -f "$guest/vmlinux" || ! -f "$guest/initramfs.cpio" ]] || ! have_virtiofsd; then
    "$repo/deploy/guest/build-assets.sh" "$guest"
fi
