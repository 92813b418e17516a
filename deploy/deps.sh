#!/usr/bin/env bash
# Installs the Debian packages isola needs, only those missing.
#   deps.sh build   what building needs
#   deps.sh test    what building and every test needs
set -euo pipefail
what="${1:-build}"
build=(build-essential pkg-config protobuf-compiler libseccomp-dev libcap-ng-dev)
# Runtime: iproute2/iptables for pod networks; the CNI plugins; QEMU for vm pods.
runtime=(iproute2 iptables containernetworking-plugins qemu-system-x86)
# Tests: a real registry, busybox to build images from, htpasswd for registry auth;
# apparmor (apparmor_parser) and dbus, which the L1 rig (tests/tests/systemd_apparmor.rs)
# runs from the host's own root file system inside L1.
tests=(docker-registry busybox-static apache2-utils openssl apparmor dbus)
pkgs=("${build[@]}")
case "$what" in
    build) pkgs+=("${runtime[@]}") ;;
    test) pkgs+=("${runtime[@]}" "${tests[@]}") ;;
    *) echo "usage: deps.sh build|test" >&2; exit 2 ;;
esac
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's docker-registry package starts a registry on :5000 via systemd where systemd
# runs; the tests start their own on free ports and never use it.
