#!/usr/bin/env bash
# Native pod start-up, isola beside containerd+runc (Debian's packages), through the same
# CRI client (isola-bench) in one run, on pods in the host network namespace (so that
# neither runtime's CNI set-up is measured), with images from a local registry.
#
#   tests/bench/compare-native.sh [ITERATIONS]      (as root; default 20)
#
# Prints each runtime's table and the ratio isola/containerd of the medians.
set -euo pipefail
n="${1:-20}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
reg=127.0.0.1:5077
for p in containerd runc docker-registry busybox-static; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" >/dev/null
done
(cd "$repo" && cargo build --release --quiet -p isola-agent -p isola-shim-native --bins && cargo build --release --quiet -p isola-tests --bin isola-bench)
bin="${CARGO_TARGET_DIR:-$repo/target}/release"
tmp="$(mktemp -d /tmp/isola-cmp.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 1
    grep "$tmp" /proc/self/mountinfo | awk '{print $5}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$tmp" 2>/dev/null || true
}
trap cleanup EXIT

# isolad
cat > "$tmp/isola.toml" <<CONF
[registry]
insecure_registries = ["$reg"]
CONF
"$bin/isolad" --config "$tmp/isola.toml" --root "$tmp/isola/root" --state "$tmp/isola/state" \
    --socket "$tmp/isola.sock" >"$tmp/isolad.log" 2>&1 &
pids+=($!)

# containerd, configured as on a kubelet node: cgroupfs, overlayfs, runc v2, no OOM score
# below 0 (this host refuses it), plain HTTP to the local registry.
mkdir -p "$tmp/certs.d/$reg"
cat > "$tmp/certs.d/$reg/hosts.toml" <<CONF
server = "http://$reg"
[host."http://$reg"]
  capabilities = ["pull", "resolve"]
CONF
cat > "$tmp/containerd.toml" <<CONF
version = 2
root = "$tmp/containerd/root"
state = "$tmp/containerd/state"
[grpc]
  address = "$tmp/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$reg/bench/pause:1"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$tmp/certs.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
CONF
containerd --config "$tmp/containerd.toml" >"$tmp/containerd.log" 2>&1 &
pids+=($!)
for s in isola containerd; do
    for _ in $(seq 100); do [[ -S "$tmp/$s.sock" ]] && break; sleep 0.1; done
done

run() { # name socket
    "$bin/isola-bench" --endpoint "$tmp/$2.sock" --name "$1" -n "$n" --local-registry "$reg" \
        --host-network --json "$tmp/$1.json" | grep -v '^{'
}
run isola isola
run containerd containerd
python3 - "$tmp/isola.json" "$tmp/containerd.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
print(f"\n{'step':<22}{'isola ms':>10}{'containerd ms':>15}{'ratio':>8}   (medians; ratio < 1: isola faster)")
for step, sa in a["steps"].items():
    sb = b["steps"].get(step)
    if not sb or not sa["ok"] or not sb["ok"]:
        continue
    print(f"{step:<22}{sa['median_ms']:>10.1f}{sb['median_ms']:>15.1f}{sa['median_ms']/sb['median_ms']:>8.2f}")
PY
