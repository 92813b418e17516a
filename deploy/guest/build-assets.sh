#!/usr/bin/env bash
# Builds every asset a VM pod needs and installs it into one directory:
#   vmlinux, bzImage     the guest kernel (build-kernel.sh, cached by its inputs)
#   isola-guest          the static guest agent (PID 1)
#   initramfs.cpio       cpio newc with isola-guest as /init (written by isola-vm-initramfs)
# and makes sure QEMU (apt: qemu-system-x86) and virtiofsd (cargo install virtiofsd
# --locked) are installed.
#
# Usage: build-assets.sh [OUTPUT_DIR]        (default /usr/share/isola/guest)
# Env:   CARGO_TARGET_DIR   cargo's target dir (default <repo>/target)
#        ISOLA_SKIP_KERNEL=1   do not build/check the kernel
#        ISOLA_SKIP_VIRTIOFSD=1   do not install virtiofsd
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-${ISOLA_GUEST_OUT:-/usr/share/isola/guest}}"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
triple=x86_64-unknown-linux-gnu
log() { echo "build-assets: $*" >&2; }
mkdir -p "$out"

# QEMU runs VM pods where isola's own VMM cannot (no vmx/svm), and the tests use it.
if ! command -v qemu-system-x86_64 >/dev/null; then
    log "installing qemu-system-x86"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-system-x86 >/dev/null ||
        { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-system-x86 >/dev/null; }
fi

if [[ "${ISOLA_SKIP_KERNEL:-0}" != 1 ]]; then
    "$here/build-kernel.sh" "$out"
fi

if [[ "${ISOLA_SKIP_VIRTIOFSD:-0}" != 1 ]]; then
    if ! command -v virtiofsd >/dev/null && [[ ! -x /usr/local/bin/virtiofsd ]]; then
        log "installing virtiofsd (cargo install, ≈2-3 min)"
        for p in libseccomp-dev libcap-ng-dev; do
            dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
                DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$p" >/dev/null
        done
        # Its own target dir: it must not contend with (or be cleaned with) the workspace's.
        CARGO_TARGET_DIR=/var/cache/isola/virtiofsd-build \
            cargo install virtiofsd --locked --root /usr/local --quiet
    fi
    log "virtiofsd: $(command -v virtiofsd || echo /usr/local/bin/virtiofsd)"
fi

# A static glibc binary: with --target, RUSTFLAGS reach only the target's crates, not
# build scripts or proc-macros (which must stay dynamic host binaries).
log "building static isola-guest"
# libcontainer links libseccomp: statically too (libseccomp-dev ships libseccomp.a).
(cd "$repo" && LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
    RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --profile guest -p isola-guest --target "$triple")
guest="$target_dir/$triple/guest/isola-guest"
if readelf -d "$guest" | grep -q NEEDED; then
    log "$guest is not static: $(readelf -d "$guest" | grep NEEDED | tr -s ' ')"; exit 1
fi
install -m 0755 "$guest" "$out/isola-guest.tmp"
strip "$out/isola-guest.tmp"
mv "$out/isola-guest.tmp" "$out/isola-guest"

log "writing initramfs"
(cd "$repo" && cargo build --quiet -p isola-vm --bin isola-vm-initramfs)
"$target_dir/debug/isola-vm-initramfs" --init "$out/isola-guest" --out "$out/initramfs.cpio"
log "done: $(ls -l "$out" | tail -n +2 | awk '{print $9" "$5}' | tr '\n' ' ')"
