#!/usr/bin/env bash
# Builds isola's microVM guest kernel from Debian's linux-source-6.1 with the config
# fragment beside this script, and installs it (vmlinux for the PVH entry, bzImage) into
# an output directory. The patches in patches/ beside it are applied first (isola's own,
# each says why in its comment).
#
# The build is cached under $ISOLA_GUEST_CACHE/<hash>/, where <hash> covers the fragment,
# this script and the linux-source package version: a second run with the same inputs
# only copies the cached files (seconds), any change rebuilds (≈12-16 min on 2 cores).
#
# Usage: build-kernel.sh [OUTPUT_DIR]        (default /usr/share/isola/guest)
# Env:   ISOLA_GUEST_CACHE  cache root       (default /var/cache/isola/guest)
#        ISOLA_KERNEL_JOBS  make -j          (default nproc)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/guest-kernel.fragment"
out="${1:-${ISOLA_GUEST_OUT:-/usr/share/isola/guest}}"
cache_root="${ISOLA_GUEST_CACHE:-/var/cache/isola/guest}"
jobs="${ISOLA_KERNEL_JOBS:-$(nproc)}"
log() { echo "build-kernel: $*" >&2; }

need_pkgs=()
for p in linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${need_pkgs[@]}" >/dev/null ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need_pkgs[@]}" >/dev/null; }
fi

src_version="$(dpkg-query -W -f='${Version}' linux-source-6.1)"
patches=("$here"/patches/*.patch)
hash="$( { cat "$fragment" "${BASH_SOURCE[0]}" "${patches[@]}"; echo "$src_version"; } | sha256sum | cut -c1-16)"
cache="$cache_root/$hash"

install_out() {
    mkdir -p "$out"
    install -m 0644 "$cache/vmlinux" "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
    install -m 0644 "$cache/bzImage" "$out/bzImage.tmp" && mv "$out/bzImage.tmp" "$out/bzImage"
    install -m 0644 "$cache/config" "$out/kernel.config"
    echo "$hash" > "$out/kernel.hash"
    log "installed vmlinux and bzImage ($hash, linux-source $src_version) in $out"
}

if [[ -f "$cache/done" ]]; then
    log "cached build $hash"
    install_out
    exit 0
fi

tarball="$(ls /usr/src/linux-source-6.1.tar.* | head -n1)"
work="$cache_root/build-$hash"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
log "unpacking $tarball"
tar -C "$work" -xf "$tarball"
tree="$(echo "$work"/linux-source-6.1)"
cd "$tree"
for p in "${patches[@]}"; do
    log "applying ${p##*/}"
    patch -p1 --quiet < "$p"
done

make ARCH=x86_64 tinyconfig >/dev/null
# merge_config.sh -m merges without re-running olddefconfig; olddefconfig resolves after.
scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
make ARCH=x86_64 olddefconfig >/dev/null

# Every fragment line must survive: a dropped option means a missing dependency.
missing=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            grep -qxF "$line" .config || { log "fragment line dropped: $line (now: $(grep -E "^(# )?${line%%=*}[= ]" .config || echo unset))"; missing=1; } ;;
        "# CONFIG_"*" is not set")
            opt="${line#\# }"; opt="${opt%% *}"
            if grep -qE "^$opt=" .config; then log "fragment says unset but: $(grep -E "^$opt=" .config)"; missing=1; fi ;;
    esac
done < "$fragment"
((missing == 0)) || { log "config verification failed"; exit 1; }

log "building bzImage vmlinux with -j$jobs"
make ARCH=x86_64 -j"$jobs" bzImage vmlinux >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; exit 1; }

mkdir -p "$cache.tmp"
cp .config "$cache.tmp/config"
cp vmlinux "$cache.tmp/vmlinux"
cp arch/x86/boot/bzImage "$cache.tmp/bzImage"
end=$(date +%s)
{
    echo "linux-source $src_version"
    echo "build_seconds $((end - start))"
    echo "bzImage_bytes $(stat -c %s arch/x86/boot/bzImage)"
    echo "vmlinux_bytes $(stat -c %s vmlinux)"
    echo "options_y $(grep -c '=y$' .config)"
} > "$cache.tmp/build-info"
touch "$cache.tmp/done"
rm -rf "$cache"
mv "$cache.tmp" "$cache"
log "built in $((end - start)) s: $(tr '\n' ' ' < "$cache/build-info")"
install_out
