#!/usr/bin/env bash
# Builds, installs and starts isolad with the native and vm runtime classes, on a fresh
# Debian 12 machine, as root. Idempotent: run it again to upgrade.
#
#   binaries        /usr/local/bin/{isolad,isola-shim-native,isola-shim-vm,isola-vmm}
#   config          /etc/isola/config.toml (written once from `isolad config default`)
#   runtime classes embedded; overrides in /etc/isola/runtime-classes/*.toml
#   RuntimeClass manifests  /usr/share/isola/runtime-classes/*.yaml (kubectl apply -f)
#   pod network     /etc/cni/net.d/10-isola.conflist (only if no CNI config exists)
#   guest assets    /usr/share/isola/guest (kernel, initramfs, guest agent; built, cached by inputs)
#   service         systemd unit isolad.service where systemd runs; else a daemon
#                   started here, logging to /var/log/isolad.log
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
log() { echo "install: $*" >&2; }
[[ $(id -u) == 0 ]] || { log "run as root"; exit 1; }

"$repo/deploy/deps.sh" build

log "building (release)"
(cd "$repo" && cargo build --release --quiet -p isola-agent -p isola-shim-native -p isola-vm -p isola-vmm)
target="${CARGO_TARGET_DIR:-$repo/target}/release"

if [[ -x "$repo/deploy/guest/build-assets.sh" && "${ISOLA_SKIP_GUEST:-0}" != 1 ]]; then
    log "building guest assets (the first kernel build takes ≈15 min; cached afterwards)"
    "$repo/deploy/guest/build-assets.sh" /usr/share/isola/guest
fi

# Stop a running agent before replacing its binary (pods and their shims keep running).
if [[ -d /run/systemd/system ]] && systemctl is-active --quiet isolad 2>/dev/null; then
    systemctl stop isolad
elif [[ -f /run/isola/isolad.pid ]] && kill -0 "$(cat /run/isola/isolad.pid)" 2>/dev/null; then
    pid="$(cat /run/isola/isolad.pid)"
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
fi

install -d /usr/local/bin /etc/isola/runtime-classes /usr/share/isola/runtime-classes
for b in isolad isola-shim-native isola-shim-vm isola-vmm; do
    [[ -x "$target/$b" ]] && install -m 0755 "$target/$b" "/usr/local/bin/$b.new" &&
        mv -f "/usr/local/bin/$b.new" "/usr/local/bin/$b"
done
[[ -f /etc/isola/config.toml ]] || /usr/local/bin/isolad config default > /etc/isola/config.toml
install -m 0644 "$repo"/runtime-classes/*.yaml /usr/share/isola/runtime-classes/
# The default pod network (bridge isola0, 10.88.0.0/16), only where no CNI config exists:
# an existing network (Calico, Cilium, flannel, ...) is never replaced.
install -d /etc/cni/net.d
if ! compgen -G '/etc/cni/net.d/*.conflist' >/dev/null && ! compgen -G '/etc/cni/net.d/*.conf' >/dev/null &&
    ! compgen -G '/etc/cni/net.d/*.json' >/dev/null; then
    install -m 0644 "$repo/deploy/cni/10-isola.conflist" /etc/cni/net.d/10-isola.conflist
    log "installed the default pod network /etc/cni/net.d/10-isola.conflist"
fi
install -d /usr/share/doc/isola && install -m 0644 "$repo/README.md" /usr/share/doc/isola/
# Where AppArmor is enabled, containers run under isola-default unless their pod asks for
# another profile (or Unconfined): load it (apparmor_parser, Debian's apparmor package),
# and put it in /etc/apparmor.d so that apparmor.service loads it again at every boot.
install -d /usr/share/isola/apparmor && install -m 0644 "$repo/deploy/apparmor/isola-default" /usr/share/isola/apparmor/
if [[ -d /etc/apparmor.d ]]; then
    install -m 0644 "$repo/deploy/apparmor/isola-default" /etc/apparmor.d/isola-default
fi
if [[ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" == Y ]]; then
    if command -v apparmor_parser >/dev/null; then
        apparmor_parser -r -W /etc/apparmor.d/isola-default && log "loaded the isola-default AppArmor profile"
    else
        log "AppArmor is enabled but apparmor_parser is missing (apt-get install apparmor): RuntimeDefault containers will be refused until isola-default is loaded"
    fi
fi

socket="$(sed -n 's/^socket = "\(.*\)"/\1/p' /etc/isola/config.toml)"
socket="${socket:-/run/isola/isola.sock}"
if [[ -d /run/systemd/system ]]; then
    install -m 0644 "$repo/deploy/isolad.service" /etc/systemd/system/isolad.service
    systemctl daemon-reload
    systemctl enable --now isolad
else
    log "systemd is not running here: starting isolad as a daemon"
    mkdir -p /run/isola
    setsid /usr/local/bin/isolad --config /etc/isola/config.toml \
        </dev/null >>/var/log/isolad.log 2>&1 &
    echo $! > /run/isola/isolad.pid
fi
for _ in $(seq 100); do [[ -S "$socket" ]] && break; sleep 0.1; done
if [[ ! -S "$socket" ]]; then
    log "isolad did not come up; see /var/log/isolad.log or journalctl -u isolad"
    exit 1
fi
log "isolad is serving the CRI on unix://$socket"
