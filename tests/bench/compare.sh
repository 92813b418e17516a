#!/usr/bin/env bash
# Pods of isola (native and vm) beside containerd+runc (Debian's packages) through the same
# CRI client (isola-bench) in one run: N iterations of RunPodSandbox, Create+Start of the
# first container, ExecSync, Stop+Remove; then K idle pods (one `sleep 3600` container
# each) up at once and the host memory of every process of each pod (RSS and PSS from
# /proc/<pid>/smaps_rollup; see isola-bench's pod_pids for how the pids are found).
#
#   tests/bench/compare.sh [ITERATIONS] [IDLE_PODS]      (as root; defaults 5 and 5)
#
# Environment:
#   ISOLA_BIN    a directory with isolad, isola-shim-native, isola-shim-vm and isola-bench
#                (skips the cargo build; default: build them, release, into
#                ${CARGO_TARGET_DIR:-target}/release)
#   RUNTIMES     which runs, default "native vm containerd"; any other word is an isola
#                runtime handler run like vm (e.g. one of ISOLA_CLASSES)
#   ISOLA_CLASSES a directory of extra runtime classes for isolad (default: none, the
#                embedded native and vm classes only)
#   TCG_TB_SIZES sizes in MiB (e.g. "32 64"): for each, a class vmtb<size> like vm whose
#                QEMU gets `-accel tcg,tb-size=<size>` in place of the shim's `-accel tcg..`
#                (through a wrapper script), run after vm
#   IDLE_SETTLE  seconds between the last idle pod's start and the measurement (default 10)
#   BENCH_ARGS   further isola-bench options for every run (e.g. --idle-exec 'free -m')
#   OUT          a directory to keep each run's JSON (per-process figures of every pod) and
#                the daemons' logs in
#
# Native pods (isola and containerd) run in the host network namespace (no CNI on either
# side); vm pods cannot share the host's network namespace, so they get one of their own
# with no CNI network (isolad's CNI conf dir is empty): the guest has no NIC. The images
# come from a local registry. Prints each run's tables, then the medians side by side with
# the ratios vm/containerd and native/containerd, and the memory per idle pod.
set -euo pipefail
n="${1:-5}"
k="${2:-5}"
settle="${IDLE_SETTLE:-10}"
runtimes=" ${RUNTIMES:-native vm containerd} "
tbs=""
for size in ${TCG_TB_SIZES:-}; do tbs+=" vmtb$size"; done
runtimes="${runtimes/ vm / vm$tbs }"
eval "extra=(${BENCH_ARGS:-})" # shell words, quotes allowed
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
reg=127.0.0.1:5077
for p in containerd runc docker-registry busybox-static qemu-system-x86; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" >/dev/null
done
if [[ -n "${ISOLA_BIN:-}" ]]; then
    bin="$ISOLA_BIN"
else
    (cd "$repo" && cargo build --release --quiet -p isola-agent -p isola-shim-native -p isola-vm --bins &&
        cargo build --release --quiet -p isola-tests --bin isola-bench)
    bin="${CARGO_TARGET_DIR:-$repo/target}/release"
fi
guest=/usr/share/isola/guest
if [[ " $runtimes " == *" vm "* ]] && ! [[ -f $guest/vmlinux && -f $guest/initramfs.cpio ]]; then
    echo "no guest assets in $guest: run deploy/guest/build-assets.sh first" >&2
    exit 1
fi
# Short: the vm shim's sockets live under <state>/pods/<64 hex>/vm/ (sun_path: 108 bytes).
tmp="$(mktemp -d /tmp/ic.XXXXXX)"
pids=()
descendants() { # pid...: the pids and all their descendants
    local p
    for p in "$@"; do
        echo "$p"
        descendants $(pgrep -P "$p" || true)
    done
}
cleanup() {
    # Whatever a failed run left behind: shims, VMMs and virtiofsd carry $tmp in their
    # command lines; containers are their descendants.
    local left=()
    for p in $(pgrep -f -- "$tmp" || true); do
        [[ $p == $$ ]] || left+=($(descendants "$p"))
    done
    for p in "${pids[@]}" "${left[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 2
    [[ -z "${OUT:-}" ]] || cp "$tmp"/*.log "$OUT/" 2>/dev/null || true
    for p in "${left[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    grep "$tmp" /proc/self/mountinfo | awk '{print $5}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$tmp" 2>/dev/null || true
}
trap cleanup EXIT

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"

# isolad: its own runtime classes dir, plain HTTP to the local registry, a CNI conf dir of
# its own (empty), streaming on a free port.
mkdir -p "$tmp/cni" "$tmp/classes"
[[ -n "${ISOLA_CLASSES:-}" ]] && cp "$ISOLA_CLASSES"/*.toml "$tmp/classes/"
for size in ${TCG_TB_SIZES:-}; do
    printf '%s\n' '#!/bin/bash' 'a=()' \
        "for x in \"\$@\"; do [[ \$x == tcg* ]] && x=tcg,tb-size=$size; a+=(\"\$x\"); done" \
        'exec qemu-system-x86_64 "${a[@]}"' > "$tmp/qemu-tb$size"
    chmod +x "$tmp/qemu-tb$size"
    sed -e "s/^handler = .*/handler = \"vmtb$size\"/" \
        -e "s|^hypervisor = .*|hypervisor = \"qemu\"\nqemu_binary = \"$tmp/qemu-tb$size\"|" \
        "$repo/runtime-classes/vm.toml" > "$tmp/classes/vmtb$size.toml"
done
cat > "$tmp/isola.toml" <<CONF
runtime_classes_dir = "$tmp/classes"
[registry]
insecure_registries = ["$reg"]
[cni]
conf_dir = "$tmp/cni"
[streaming]
address = "127.0.0.1:0"
CONF
"$bin/isolad" --config "$tmp/isola.toml" --root "$tmp/r" --state "$tmp/s" \
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
if [[ " $runtimes " == *" containerd "* ]]; then
    containerd --config "$tmp/containerd.toml" >"$tmp/containerd.log" 2>&1 &
    pids+=($!)
fi
for s in isola containerd; do
    [[ $s == containerd && " $runtimes " != *" containerd "* ]] && continue
    for _ in $(seq 100); do [[ -S "$tmp/$s.sock" ]] && break; sleep 0.1; done
done

run() { # name socket [isola-bench options]
    local name="$1" sock="$2"
    shift 2
    "$bin/isola-bench" --endpoint "$tmp/$sock.sock" --name "$name" -n "$n" \
        --local-registry "$reg" --no-big-pull --idle-pods "$k" --idle-settle "$settle" \
        --json "$tmp/$name.json" "${extra[@]}" "$@" | grep -v '^{'
    [[ -z "${OUT:-}" ]] || { mkdir -p "$OUT" && cp "$tmp/$name.json" "$OUT/"; }
    echo
}
for r in $runtimes; do
    case "$r" in
    native) run native isola --host-network ;;
    containerd) run containerd containerd --host-network ;;
    *) run "$r" isola --handler "$r" ;;
    esac
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
echo "load average: before $load_before, after $load_after ($(nproc) CPUs)"
python3 - "$tmp" $runtimes <<'PY'
import json, os, sys
tmp, names = sys.argv[1], sys.argv[2:]
runs = {n: json.load(open(os.path.join(tmp, n + ".json"))) for n in names
        if os.path.exists(os.path.join(tmp, n + ".json"))}
base = runs.get("containerd")
others = [n for n in runs if n != "containerd"]  # ratios against containerd
head = f"{'step (median ms)':<22}" + "".join(f"{n:>12}" for n in runs)
if base:
    head += "".join(f"{n + '/ctrd':>14}" for n in others)
print("\n" + head)
steps = []
for r in runs.values():
    steps += [s for s in r.get("order", r["steps"]) if s not in steps]
for step in steps:
    vals = {n: r["steps"].get(step) for n, r in runs.items()}
    med = {n: v["median_ms"] if v and v["ok"] else None for n, v in vals.items()}
    line = f"{step:<22}" + "".join(f"{m:>12.1f}" if m is not None else f"{'-':>12}" for m in med.values())
    if base:
        b = med.get("containerd")
        line += "".join(f"{med[n] / b:>14.2f}" if med[n] is not None and b else f"{'-':>14}" for n in others)
    print(line)
print(f"\n{'idle pod (median MiB)':<22}" + "".join(f"{n:>12}" for n in runs))
for key, label in (("rss_mib_median", "RSS sum"), ("pss_mib_median", "PSS sum")):
    print(f"{label:<22}" + "".join(
        f"{r['memory'][key]:>12.1f}" if key in r.get("memory", {}) else f"{'-':>12}"
        for r in runs.values()))
for n, r in runs.items():
    procs = r.get("memory", {}).get("processes", {})
    print(f"  {n}: " + ", ".join(f"{c} {p['pss_mib']:.1f} PSS / {p['rss_mib']:.1f} RSS"
                                 for c, p in procs.items()))
for n, r in runs.items():
    pss = r.get("memory", {}).get("pss_mib_median")
    if n not in ("native", "containerd") and pss is not None:
        print(f"\n{n} pod target < 64 MiB host memory: PSS {pss:.1f} MiB -> {'met' if pss < 64 else 'NOT met'}")
PY
