#!/usr/bin/env bash
# Runs every test of isola on a fresh Debian 12 machine, as root: installs what the tests
# need (apt packages, guest kernel and initramfs, virtiofsd), checks formatting and lints,
# builds, and runs the unit and end-to-end tests (real socket, real registry, real
# namespaces, real guests).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"
log() { echo "test: $*" >&2; }
[[ $(id -u) == 0 ]] || { log "the tests need root (namespaces, mounts, cgroups, TAP devices)"; exit 1; }
start=$(date +%s)

"$repo/deploy/deps.sh" test

if [[ -x "$repo/deploy/guest/build-assets.sh" ]]; then
    export ISOLA_GUEST_DIR="${ISOLA_GUEST_DIR:-/usr/share/isola/guest}"
    log "guest assets into $ISOLA_GUEST_DIR ($(($(date +%s) - start))s)"
    "$repo/deploy/guest/build-assets.sh" "$ISOLA_GUEST_DIR"
    export ISOLA_GUEST_KERNEL="$ISOLA_GUEST_DIR/vmlinux"
    export ISOLA_GUEST_INITRAMFS="$ISOLA_GUEST_DIR/initramfs.cpio"
    export ISOLA_GUEST_AGENT="$ISOLA_GUEST_DIR/isola-guest"
fi

# ---- isola-vmm (shims/vmm): the nested KVM rig its tests boot guests in ----
# This host's /dev/kvm cannot run Linux; shims/vmm/tests/nested.rs runs isola-vmm inside
# an L1 guest (QEMU TCG, Debian's cloud kernel with kvm-amd). prepare.sh installs QEMU,
# that kernel, busybox-static, cpio and e2fsprogs if missing (the test itself runs with
# `cargo test --workspace` below, ≈30-60 s). The same kernel, QEMU, busybox, cpio and
# virtiofsd boot the L1 machine with systemd, cgroup v2 and AppArmor in which
# tests/tests/systemd_apparmor.rs runs the systemd cgroup driver and AppArmor (≈5 min).
log "isola-vmm rig prerequisites ($(($(date +%s) - start))s)"
"$repo/shims/vmm/rig/prepare.sh"
# ---- end isola-vmm ----

log "fmt + clippy ($(($(date +%s) - start))s)"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

log "build ($(($(date +%s) - start))s)"
cargo build --workspace --bins --quiet

log "tests ($(($(date +%s) - start))s)"
cargo test --workspace --no-fail-fast 2>&1 | tee /tmp/isola-test.log
status=${PIPESTATUS[0]}
log "done in $(($(date +%s) - start))s"
exit "$status"
