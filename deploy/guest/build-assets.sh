#!/usr/bin/env bash
# Builds every asset a VM pod needs and installs it into one directory:
#   vmlinux, bzImage     the guest kernel (build-kernel.sh, cached by its inputs)
#   isola-guest-init     the static guest agent without its shim (PID 1, ~1 MiB)
#   initramfs.cpio       cpio newc with isola-guest-init as /init (isola-vm-initramfs)
#   isola-guest          the static guest agent with the shim API, which /init executes
#                        from the pod's virtio-fs share (the vm class's `agent`)
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
# Built twice: /init without the shim (--no-default-features), the agent with it.
build_guest() { # name cargo-feature-args...
    local name="$1"
    shift
    log "building static $name"
    # libcontainer links libseccomp: statically too (libseccomp-dev ships libseccomp.a).
    (cd "$repo" && LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
        RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --quiet --profile guest -p isola-guest --target "$triple" "$@")
    local bin="$target_dir/$triple/guest/isola-guest"
    if readelf -d "$bin" | grep -q NEEDED; then
        log "$bin is not static: $(readelf -d "$bin" | grep NEEDED | tr -s ' ')"; exit 1
    fi
    install -m 0755 "$bin" "$out/$name.tmp"
    strip "$out/$name.tmp"
    mv "$out/$name.tmp" "$out/$name"
}
build_guest isola-guest-init --no-default-features
build_guest isola-guest

log "writing initramfs"
(cd "$repo" && cargo build --quiet -p isola-vm --bin isola-vm-initramfs)
"$target_dir/debug/isola-vm-initramfs" --init "$out/isola-guest-init" --out "$out/initramfs.cpio"
log "done: $(ls -l "$out" | tail -n +2 | awk '{print $9" "$5}' | tr '\n' ' ')"
