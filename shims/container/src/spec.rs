//! CRI container config + image config + pod context → OCI runtime spec.
//!
//! The spec is assembled as OCI JSON (the field names of the runtime spec, which reviewers
//! can check against it line by line) and then typed and validated by deserialising it
//! into `oci_spec::runtime::Spec`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use isola_proto::cri;
use oci_spec::runtime::Spec;
use serde_json::{json, Value};

use crate::seccomp;
use crate::users;

/// Errors building a spec; each names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The request is not valid for this container.
    #[error("{0}")]
    Invalid(String),
    /// The user or group does not resolve in the image.
    #[error(transparent)]
    User(#[from] users::UserError),
    /// A seccomp profile could not be loaded.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// An AppArmor profile cannot be applied here.
    #[error(transparent)]
    AppArmor(#[from] crate::apparmor::AppArmorError),
    /// The assembled spec is not a valid OCI spec (a bug).
    #[error("assembled OCI spec does not validate: {0}")]
    Oci(String),
}

/// What the runtime takes from an image's config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env` (`K=V`).
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
    /// `User`.
    pub user: String,
    /// `StopSignal`.
    pub stop_signal: String,
}

impl ImageConfig {
    /// Reads the fields from an OCI image config document (`{"config": {...}}`); an
    /// empty document is an image with no config.
    pub fn from_json(text: &str) -> Result<ImageConfig, SpecError> {
        if text.trim().is_empty() {
            return Ok(ImageConfig::default());
        }
        let v: Value = serde_json::from_str(text)
            .map_err(|e| SpecError::Invalid(format!("image config is not JSON: {e}")))?;
        let c = v.get("config").cloned().unwrap_or(Value::Null);
        let strings = |k: &str| -> Vec<String> {
            c.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let string = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        Ok(ImageConfig {
            entrypoint: strings("Entrypoint"),
            cmd: strings("Cmd"),
            env: strings("Env"),
            working_dir: string("WorkingDir"),
            user: string("User"),
            stop_signal: string("StopSignal"),
        })
    }
}

/// The pod a container joins: its namespaces, files and cgroup.
#[derive(Debug, Clone, Default)]
pub struct PodContext {
    /// The pod's hostname ($HOSTNAME).
    pub hostname: String,
    /// Network namespace to join; None shares the host's.
    pub netns: Option<PathBuf>,
    /// IPC namespace to join; None shares the host's.
    pub ipcns: Option<PathBuf>,
    /// UTS namespace to join; None shares the host's.
    pub utsns: Option<PathBuf>,
    /// PID namespace to join (pod-wide PID namespace); None: the container's own, unless
    /// `host_pid`.
    pub pidns: Option<PathBuf>,
    /// Share the host's PID namespace.
    pub host_pid: bool,
    /// Files bind-mounted at /etc/hosts, /etc/hostname, /etc/resolv.conf.
    pub etc_hosts: Option<PathBuf>,
    /// /etc/hostname source.
    pub etc_hostname: Option<PathBuf>,
    /// /etc/resolv.conf source.
    pub resolv_conf: Option<PathBuf>,
    /// The pod's /dev/shm (shared by its containers).
    pub shm: Option<PathBuf>,
    /// The pod's cgroup (cgroupfs path or systemd slice).
    pub cgroup_parent: String,
    /// Pod-level sysctls.
    pub sysctls: HashMap<String, String>,
}

/// Runtime-wide choices.
#[derive(Debug, Clone, Default)]
pub struct SpecOptions {
    /// Clamp negative oom_score_adj to 0 (no CAP_SYS_RESOURCE).
    pub restrict_oom_score_adj: bool,
    /// Cgroups through systemd.
    pub systemd_cgroup: bool,
}

/// A spec and what the runtime applies itself.
#[derive(Debug)]
pub struct Generated {
    /// The OCI spec (root path `rootfs`, relative to the bundle).
    pub spec: Spec,
    /// To write to /proc/<pid>/oom_score_adj between create and start (libcontainer
    /// would write the caller's own).
    pub oom_score_adj: Option<i32>,
    /// The signal that asks the container to stop.
    pub stop_signal: i32,
    /// The cgroup path given to the runtime.
    pub cgroups_path: String,
}

const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability of Linux 5.9+, in number order.
pub const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// `NET_ADMIN`, `cap_net_admin`, `CAP_NET_ADMIN` → `CAP_NET_ADMIN`; `ALL` stays.
fn normalise_cap(c: &str) -> Result<String, SpecError> {
    let up = c.to_ascii_uppercase();
    if up == "ALL" {
        return Ok(up);
    }
    let full = if up.starts_with("CAP_") {
        up
    } else {
        format!("CAP_{up}")
    };
    if !ALL_CAPS.contains(&full.as_str()) {
        return Err(SpecError::Invalid(format!(
            "linux.security_context.capabilities: unknown capability {c:?}"
        )));
    }
    Ok(full)
}

/// Parses a signal name or number (`SIGTERM`, `TERM`, `15`).
pub fn parse_signal(s: &str) -> Option<i32> {
    if s.is_empty() {
        return None;
    }
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name).to_owned();
    let table: &[(&str, i32)] = &[
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("KILL", libc::SIGKILL),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("TERM", libc::SIGTERM),
        ("STOP", libc::SIGSTOP),
        ("CONT", libc::SIGCONT),
        ("WINCH", libc::SIGWINCH),
        ("PWR", libc::SIGPWR),
        ("ABRT", libc::SIGABRT),
        ("ALRM", libc::SIGALRM),
    ];
    if let Some((_, n)) = table.iter().find(|(k, _)| *k == name) {
        return Some(*n);
    }
    if let Some(off) = name.strip_prefix("RTMIN+") {
        return off.parse::<i32>().ok().map(|o| libc::SIGRTMIN() + o);
    }
    None
}

fn env_key(e: &str) -> &str {
    e.split_once('=').map(|(k, _)| k).unwrap_or(e)
}

/// The process arguments, merged with the image as Docker and containerd do: a command
/// replaces the entrypoint (and drops the image's Cmd); args alone replace Cmd.
pub fn merge_args(
    config: &cri::ContainerConfig,
    image: &ImageConfig,
) -> Result<Vec<String>, SpecError> {
    let mut command = config.command.clone();
    let mut args = config.args.clone();
    if command.is_empty() {
        if args.is_empty() {
            args = image.cmd.clone();
        }
        command = image.entrypoint.clone();
    }
    let all: Vec<String> = command.into_iter().chain(args).collect();
    if all.is_empty() {
        return Err(SpecError::Invalid(
            "config.command: no command given and the image has neither Entrypoint nor Cmd".into(),
        ));
    }
    Ok(all)
}

/// A device node found on the host, as it will appear in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostDevice {
    path: String,
    kind: &'static str,
    major: i64,
    minor: i64,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// The device node at `host` (symlinks followed), to appear at `container`; None when it
/// is not a device node.
fn device_at(host: &Path, container: &str) -> std::io::Result<Option<HostDevice>> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(host)?;
    let kind = if meta.file_type().is_char_device() {
        "c"
    } else if meta.file_type().is_block_device() {
        "b"
    } else {
        return Ok(None);
    };
    let rdev = meta.rdev();
    Ok(Some(HostDevice {
        path: container.to_owned(),
        kind,
        major: i64::from(libc::major(rdev)),
        minor: i64::from(libc::minor(rdev)),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    }))
}

/// Every device node under the host directory `host`, recursively, placed under
/// `container`; `skip` names entries of the top directory to leave out.
fn devices_under(host: &Path, container: &str, skip: &[&str]) -> Vec<HostDevice> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(host) else {
        return out;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if skip.contains(&name.as_str()) {
            continue;
        }
        let target = format!("{}/{name}", container.trim_end_matches('/'));
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            out.extend(devices_under(&e.path(), &target, &[]));
        } else if !ft.is_symlink() {
            // Device nodes that vanish while we look are skipped, as runc does.
            if let Ok(Some(d)) = device_at(&e.path(), &target) {
                out.push(d);
            }
        }
    }
    out
}

/// The host's devices for a privileged container: all of /dev but the per-container
/// file systems and the console (runc's HostDevices).
fn privileged_devices() -> Vec<HostDevice> {
    devices_under(
        Path::new("/dev"),
        "/dev",
        &[
            "pts",
            "shm",
            "fd",
            "mqueue",
            "console",
            ".lxc",
            ".lxd-mounts",
            ".udev",
        ],
    )
}

/// The capabilities in this process's bounding set (every one if it cannot be read).
fn current_capabilities() -> Vec<String> {
    let bounding = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX);
    ALL_CAPS
        .iter()
        .enumerate()
        .filter(|(bit, _)| bounding & (1u64 << bit) != 0)
        .map(|(_, c)| c.to_string())
        .collect()
}

/// Checks a container device path: absolute, under /dev, without `..`.
fn check_device_path(p: &str) -> Result<(), SpecError> {
    let path = Path::new(p);
    let ok = path.is_absolute()
        && path.starts_with("/dev")
        && path != Path::new("/dev")
        && !path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
    if ok {
        Ok(())
    } else {
        Err(SpecError::Invalid(format!(
            "config.devices: container_path {p:?} must be an absolute path under /dev"
        )))
    }
}

/// One CRI device: a device node, or a directory of them (as containerd), and the
/// cgroup access it is granted.
fn requested_device(d: &cri::Device) -> Result<(Vec<HostDevice>, String), SpecError> {
    if !d.host_path.starts_with('/') {
        return Err(SpecError::Invalid(format!(
            "config.devices: host_path {:?} must be an absolute path",
            d.host_path
        )));
    }
    let container = if d.container_path.is_empty() {
        d.host_path.as_str()
    } else {
        d.container_path.as_str()
    };
    check_device_path(container)?;
    let access = if d.permissions.is_empty() {
        "rwm".to_owned()
    } else {
        d.permissions.clone()
    };
    let mut seen = String::new();
    for c in access.chars() {
        if !"rwm".contains(c) || seen.contains(c) {
            return Err(SpecError::Invalid(format!(
                "config.devices: permissions {:?} of {:?} must be a combination of r, w and m",
                d.permissions, d.host_path
            )));
        }
        seen.push(c);
    }
    let host = Path::new(&d.host_path);
    let meta = std::fs::metadata(host).map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::NotFound {
            "no such device on the host".to_owned()
        } else {
            e.to_string()
        };
        SpecError::Invalid(format!(
            "config.devices: host_path {:?}: {why}",
            d.host_path
        ))
    })?;
    if meta.is_dir() {
        let found = devices_under(host, container, &[]);
        if found.is_empty() {
            return Err(SpecError::Invalid(format!(
                "config.devices: host_path {:?} is a directory without device nodes",
                d.host_path
            )));
        }
        return Ok((found, access));
    }
    match device_at(host, container) {
        Ok(Some(dev)) => Ok((vec![dev], access)),
        Ok(None) => Err(SpecError::Invalid(format!(
            "config.devices: host_path {:?} is not a device node",
            d.host_path
        ))),
        Err(e) => Err(SpecError::Invalid(format!(
            "config.devices: host_path {:?}: {e}",
            d.host_path
        ))),
    }
}

/// /sys/fs/cgroup of a container on cgroup v1 with the cgroupfs driver, as runc mounts
/// it: a tmpfs, and in it, per hierarchy the container has a cgroup in, a bind of that
/// cgroup's directory (`<host mount point>/<cgroups_path>`, which libcontainer creates
/// before it prepares the rootfs) at the hierarchy's name. A co-mounted hierarchy
/// (cpu,cpuacct) is bound under each controller's name too, in place of the host's
/// cpu -> cpu,cpuacct symlinks.
fn cgroup_v1_mounts(
    hierarchies: &[crate::cgroups::V1Hierarchy],
    cgroups_path: &str,
    mode: &str,
) -> Vec<Value> {
    let mut mounts = vec![
        json!({"destination": "/sys/fs/cgroup", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "noexec", "mode=755"]}),
    ];
    let names: Vec<&str> = hierarchies
        .iter()
        .filter_map(|h| h.mount_point.file_name()?.to_str())
        .collect();
    let mut taken: Vec<String> = Vec::new();
    for h in hierarchies {
        let Some(name) = h.mount_point.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let source = h.mount_point.join(cgroups_path.trim_start_matches('/'));
        let mut dests = vec![name.to_owned()];
        if name.contains(',') {
            dests.extend(
                h.controllers
                    .iter()
                    .filter(|c| !names.contains(&c.as_str()) && name.split(',').any(|n| n == *c))
                    .cloned(),
            );
        }
        for d in dests {
            if taken.contains(&d) {
                continue;
            }
            mounts.push(json!({"destination": format!("/sys/fs/cgroup/{d}"), "type": "bind", "source": source, "options": ["rbind", "rprivate", "nosuid", "noexec", "nodev", mode]}));
            taken.push(d);
        }
    }
    mounts
}

/// Builds the spec.
pub fn generate(
    container_id: &str,
    config: &cri::ContainerConfig,
    image: &ImageConfig,
    rootfs: &Path,
    pod: &PodContext,
    opts: &SpecOptions,
) -> Result<Generated, SpecError> {
    let linux = config.linux.clone().unwrap_or_default();
    let sc = linux.security_context.clone().unwrap_or_default();
    let privileged = sc.privileged;

    // Process: args, env, cwd, user.
    let args = merge_args(config, image)?;
    let mut env: Vec<String> = Vec::new();
    let mut set = |kv: String| {
        let k = env_key(&kv).to_owned();
        env.retain(|e| env_key(e) != k);
        env.push(kv);
    };
    set("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    if !pod.hostname.is_empty() {
        set(format!("HOSTNAME={}", pod.hostname));
    }
    for e in &image.env {
        set(e.clone());
    }
    for kv in &config.envs {
        if kv.key.is_empty() {
            return Err(SpecError::Invalid(
                "config.envs: an entry has an empty key".into(),
            ));
        }
        set(format!("{}={}", kv.key, kv.value));
    }
    let user_spec = match (&sc.run_as_user, sc.run_as_username.as_str()) {
        (Some(u), _) => {
            if u.value < 0 || u.value > u32::MAX as i64 {
                return Err(SpecError::Invalid(format!(
                    "linux.security_context.run_as_user: {} is not a uid",
                    u.value
                )));
            }
            // Keep the image's group part only if no explicit group is given.
            u.value.to_string()
        }
        (None, name) if !name.is_empty() => name.to_owned(),
        _ => image.user.clone(),
    };
    let explicit_gid = match &sc.run_as_group {
        Some(g) if g.value >= 0 && g.value <= u32::MAX as i64 => Some(g.value as u32),
        Some(g) => {
            return Err(SpecError::Invalid(format!(
                "linux.security_context.run_as_group: {} is not a gid",
                g.value
            )))
        }
        None => None,
    };
    let extra: Vec<u32> = sc
        .supplemental_groups
        .iter()
        .filter_map(|g| u32::try_from(*g).ok())
        .collect();
    let id = users::resolve(rootfs, &user_spec, explicit_gid, &extra)?;
    if !env.iter().any(|e| env_key(e) == "HOME") {
        env.push(format!("HOME={}", id.home));
    }
    let cwd = if !config.working_dir.is_empty() {
        config.working_dir.clone()
    } else if !image.working_dir.is_empty() {
        image.working_dir.clone()
    } else {
        "/".into()
    };
    if !cwd.starts_with('/') {
        return Err(SpecError::Invalid(format!(
            "config.working_dir: {cwd:?} must be absolute"
        )));
    }

    // Capabilities: "all" is every capability this process may hand on (containerd's
    // WithAllCurrentCapabilities), so that a privileged container starts where the
    // runtime itself lacks some (CAP_SYS_RESOURCE in a container).
    let all_caps = current_capabilities();
    let mut caps: Vec<String> = if privileged {
        all_caps.clone()
    } else {
        DEFAULT_CAPS.iter().map(|s| s.to_string()).collect()
    };
    if let Some(c) = &sc.capabilities {
        for a in &c.add_capabilities {
            match normalise_cap(a)?.as_str() {
                "ALL" => caps = all_caps.clone(),
                cap => {
                    if !caps.iter().any(|x| x == cap) {
                        caps.push(cap.to_owned());
                    }
                }
            }
        }
        for d in &c.drop_capabilities {
            match normalise_cap(d)?.as_str() {
                "ALL" => caps.clear(),
                cap => caps.retain(|x| x != cap),
            }
        }
        for a in &c.add_ambient_capabilities {
            let cap = normalise_cap(a)?;
            if !caps.contains(&cap) {
                caps.push(cap);
            }
        }
    }
    let ambient: Vec<String> = sc
        .capabilities
        .as_ref()
        .map(|c| {
            c.add_ambient_capabilities
                .iter()
                .filter_map(|a| normalise_cap(a).ok())
                .collect()
        })
        .unwrap_or_default();

    // Namespaces.
    let mut namespaces = vec![json!({"type": "mount"})];
    let ns = |t: &str, p: &Option<PathBuf>| p.as_ref().map(|p| json!({"type": t, "path": p}));
    namespaces.extend(ns("network", &pod.netns));
    namespaces.extend(ns("ipc", &pod.ipcns));
    namespaces.extend(ns("uts", &pod.utsns));
    match (&pod.pidns, pod.host_pid) {
        (Some(p), _) => namespaces.push(json!({"type": "pid", "path": p})),
        (None, true) => {}
        (None, false) => namespaces.push(json!({"type": "pid"})),
    }
    // On cgroup v2 a container gets a cgroup namespace of its own (containerd's default
    // there), so its /sys/fs/cgroup is its own cgroup: memory.max etc. at the top, as
    // the cgroup v1 bind mounts give.
    if crate::cgroups::is_v2() {
        namespaces.push(json!({"type": "cgroup"}));
    }

    // Mounts.
    let cri_targets: Vec<&str> = config
        .mounts
        .iter()
        .map(|m| m.container_path.as_str())
        .collect();
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
    ];
    mounts.push(match &pod.shm {
        Some(shm) => json!({"destination": "/dev/shm", "type": "bind", "source": shm, "options": ["rbind", "rprivate", "nosuid", "noexec", "nodev"]}),
        None => json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
    });
    let sys_ro = if privileged { "rw" } else { "ro" };
    if pod.netns.is_some() {
        mounts.push(json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", sys_ro]}));
    } else {
        // sysfs cannot be mounted without an own network namespace: bind the host's.
        mounts.push(json!({"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "rprivate", "nosuid", "noexec", "nodev", sys_ro]}));
    }
    let cgroups_path = if opts.systemd_cgroup {
        let parent = if pod.cgroup_parent.is_empty() {
            "system.slice"
        } else {
            &pod.cgroup_parent
        };
        let unit = crate::systemd::spec_path(parent, container_id);
        if crate::systemd::available() {
            unit
        } else {
            // Without systemd managing the unified hierarchy (cgroup v1, or no systemd
            // as PID 1) libcontainer cannot start a scope: the same cgroup, made
            // directly (libcontainer's v1 manager would take `<slice>:isola:<id>` for a
            // directory name).
            crate::systemd::fs_path(&unit)
        }
    } else {
        let parent = if pod.cgroup_parent.is_empty() {
            "/isola"
        } else {
            pod.cgroup_parent.trim_end_matches('/')
        };
        format!("{parent}/{container_id}")
    };
    // On cgroup v1 with cgroupfs, /sys/fs/cgroup is built as runc builds it, not left to
    // libcontainer's `cgroup` mount: that looks its parent up by pid in the host's /proc,
    // a pid of the pod's PID namespace, so it failed (no such host process) or read an
    // unrelated host process's cgroups.
    let v1_cgroupfs = !crate::cgroups::is_v2();
    if v1_cgroupfs {
        mounts.extend(cgroup_v1_mounts(
            &crate::cgroups::v1_hierarchies(),
            &cgroups_path,
            sys_ro,
        ));
    } else {
        mounts.push(json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", sys_ro]}));
    }
    for (dest, src) in [
        ("/etc/hosts", &pod.etc_hosts),
        ("/etc/hostname", &pod.etc_hostname),
        ("/etc/resolv.conf", &pod.resolv_conf),
    ] {
        if let Some(src) = src {
            if !cri_targets.contains(&dest) {
                let mode = if sc.readonly_rootfs { "ro" } else { "rw" };
                mounts.push(json!({"destination": dest, "type": "bind", "source": src, "options": ["rbind", "rprivate", mode]}));
            }
        }
    }
    for m in &config.mounts {
        if !m.container_path.starts_with('/') {
            return Err(SpecError::Invalid(format!(
                "config.mounts: container_path {:?} must be absolute",
                m.container_path
            )));
        }
        if !m.host_path.starts_with('/') {
            return Err(SpecError::Invalid(format!(
                "config.mounts: host_path {:?} must be absolute",
                m.host_path
            )));
        }
        let prop = match cri::MountPropagation::try_from(m.propagation) {
            Ok(cri::MountPropagation::PropagationHostToContainer) => "rslave",
            Ok(cri::MountPropagation::PropagationBidirectional) => "rshared",
            _ => "rprivate",
        };
        let mut options = vec!["rbind", prop, if m.readonly { "ro" } else { "rw" }];
        if m.recursive_read_only {
            options.push("rro");
        }
        mounts.push(json!({"destination": m.container_path, "type": "bind", "source": m.host_path, "options": options}));
    }

    // Devices: a privileged container gets every host device (as runc under containerd
    // does), then the requested ones, which win on the same container path.
    let mut devices: Vec<Value> = Vec::new();
    let mut device_rules = vec![json!({"allow": privileged, "access": "rwm"})];
    let mut add = |found: Vec<HostDevice>, access: &str| {
        for d in found {
            devices.retain(|x| x["path"] != json!(d.path));
            // A privileged container's cgroup already allows every device.
            if !privileged {
                device_rules.push(json!({"allow": true, "type": d.kind, "major": d.major, "minor": d.minor, "access": access}));
            }
            devices.push(json!({"path": d.path, "type": d.kind, "major": d.major, "minor": d.minor, "fileMode": d.mode, "uid": d.uid, "gid": d.gid}));
        }
    };
    if privileged {
        add(privileged_devices(), "rwm");
    }
    for d in &config.devices {
        let (found, access) = requested_device(d)?;
        add(found, &access);
    }
    // Resources.
    let r = linux.resources.clone().unwrap_or_default();
    let mut resources = json!({"devices": device_rules});
    let mut cpu = serde_json::Map::new();
    if r.cpu_shares > 0 {
        cpu.insert("shares".into(), json!(r.cpu_shares));
    }
    if r.cpu_quota != 0 {
        cpu.insert("quota".into(), json!(r.cpu_quota));
    }
    if r.cpu_period > 0 {
        cpu.insert("period".into(), json!(r.cpu_period));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.insert("cpus".into(), json!(r.cpuset_cpus));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.insert("mems".into(), json!(r.cpuset_mems));
    }
    if !cpu.is_empty() {
        resources["cpu"] = Value::Object(cpu);
    }
    if r.memory_limit_in_bytes > 0 {
        let mut mem = json!({"limit": r.memory_limit_in_bytes});
        if r.memory_swap_limit_in_bytes > 0 {
            mem["swap"] = json!(r.memory_swap_limit_in_bytes);
        }
        resources["memory"] = mem;
    }
    if !r.unified.is_empty() {
        resources["unified"] = json!(r.unified);
    }
    let oom_score_adj = (r.oom_score_adj != 0).then(|| {
        let v = r.oom_score_adj.clamp(-1000, 1000) as i32;
        if opts.restrict_oom_score_adj && v < 0 {
            0
        } else {
            v
        }
    });

    let mut linux_json = json!({
        "namespaces": namespaces,
        "resources": resources,
        "cgroupsPath": cgroups_path,
        "devices": devices,
        "rootfsPropagation": "private",
    });
    if !privileged {
        let masked: Vec<String> = if sc.masked_paths.is_empty() {
            MASKED_PATHS.iter().map(|s| s.to_string()).collect()
        } else {
            sc.masked_paths.clone()
        };
        let mut ro: Vec<String> = if sc.readonly_paths.is_empty() {
            READONLY_PATHS.iter().map(|s| s.to_string()).collect()
        } else {
            sc.readonly_paths.clone()
        };
        // The tmpfs holding the cgroup v1 binds is made read-only once they are in
        // (as runc does); the binds keep their own read-only flag.
        if v1_cgroupfs && !ro.iter().any(|p| p == "/sys/fs/cgroup") {
            ro.push("/sys/fs/cgroup".into());
        }
        linux_json["maskedPaths"] = json!(masked);
        linux_json["readonlyPaths"] = json!(ro);
    }
    for key in pod.sysctls.keys() {
        let (ns, held) = if key.starts_with("kernel.shm")
            || key.starts_with("kernel.msg")
            || key == "kernel.sem"
            || key.starts_with("fs.mqueue.")
        {
            ("IPC", pod.ipcns.is_some())
        } else if key.starts_with("net.") {
            ("network", pod.netns.is_some())
        } else if key == "kernel.hostname" || key == "kernel.domainname" {
            ("UTS", pod.utsns.is_some())
        } else {
            return Err(SpecError::Invalid(format!(
                "linux.sysctls: {key} is not a namespaced sysctl: it would change the host"
            )));
        };
        if !held {
            return Err(SpecError::Invalid(format!(
                "linux.sysctls: {key} needs the pod's own {ns} namespace, but the pod shares the host's"
            )));
        }
    }
    if !pod.sysctls.is_empty() {
        linux_json["sysctl"] = json!(pod.sysctls);
    }
    // Seccomp: the typed field first, then the deprecated path form; unset means
    // unconfined (as containerd), privileged containers are never filtered.
    if !privileged {
        let profile = match &sc.seccomp {
            Some(p) => match cri::security_profile::ProfileType::try_from(p.profile_type) {
                Ok(cri::security_profile::ProfileType::RuntimeDefault) => {
                    Some(seccomp::default_profile(&caps))
                }
                Ok(cri::security_profile::ProfileType::Localhost) => {
                    Some(seccomp::localhost_profile(&p.localhost_ref, &caps)?)
                }
                _ => None,
            },
            #[allow(deprecated)]
            None => match sc.seccomp_profile_path.as_str() {
                "runtime/default" | "docker/default" => Some(seccomp::default_profile(&caps)),
                p if p.starts_with("localhost/") => {
                    Some(seccomp::localhost_profile(&p["localhost".len()..], &caps)?)
                }
                _ => None,
            },
        };
        if let Some(p) = profile {
            linux_json["seccomp"] = p;
        }
    }

    let process = json!({
        "terminal": config.tty,
        "user": {"uid": id.uid, "gid": id.gid, "additionalGids": id.additional_gids},
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": {
            "bounding": caps, "effective": caps, "permitted": caps,
            "inheritable": Vec::<String>::new(), "ambient": ambient,
        },
    });
    // Only when set: libcontainer treats a present `false` as set and then loads seccomp
    // after dropping CAP_SYS_ADMIN, which the kernel refuses without no_new_privs.
    let mut process = process;
    if sc.no_new_privs {
        process["noNewPrivileges"] = json!(true);
    }
    if let Some(profile) = crate::apparmor::profile(&sc, &crate::apparmor::HostAppArmor::detect())?
    {
        process["apparmorProfile"] = json!(profile);
    }
    let spec = json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": sc.readonly_rootfs},
        "process": process,
        "mounts": mounts,
        "linux": linux_json,
    });
    let spec: Spec = serde_json::from_value(spec).map_err(|e| SpecError::Oci(e.to_string()))?;
    let stop_signal = parse_signal(&image.stop_signal).unwrap_or(libc::SIGTERM);
    Ok(Generated {
        spec,
        oom_score_adj,
        stop_signal,
        cgroups_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfig {
        ImageConfig::from_json(
            r#"{"config":{"Entrypoint":["/bin/ep"],"Cmd":["c1","c2"],"Env":["A=1","PATH=/img"],"WorkingDir":"/w","User":"","StopSignal":"SIGQUIT"}}"#,
        )
        .expect("image")
    }

    fn gen(config: &cri::ContainerConfig) -> Generated {
        let root = tempfile::tempdir().expect("root");
        generate(
            "cid",
            config,
            &image(),
            root.path(),
            &PodContext::default(),
            &SpecOptions::default(),
        )
        .expect("spec")
    }

    #[test]
    fn args_follow_docker_rules() {
        let img = image();
        let mut c = cri::ContainerConfig::default();
        assert_eq!(
            merge_args(&c, &img).expect("x"),
            vec!["/bin/ep", "c1", "c2"]
        );
        c.args = vec!["a".into()];
        assert_eq!(merge_args(&c, &img).expect("x"), vec!["/bin/ep", "a"]);
        c.command = vec!["/bin/sh".into()];
        assert_eq!(merge_args(&c, &img).expect("x"), vec!["/bin/sh", "a"]);
        c.args.clear();
        assert_eq!(merge_args(&c, &img).expect("x"), vec!["/bin/sh"]);
        assert!(merge_args(&cri::ContainerConfig::default(), &ImageConfig::default()).is_err());
    }

    #[test]
    fn env_user_caps_and_resources() {
        let c = cri::ContainerConfig {
            envs: vec![cri::KeyValue {
                key: "A".into(),
                value: "2".into(),
            }],
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: 64 << 20,
                    cpu_quota: 50_000,
                    cpu_period: 100_000,
                    oom_score_adj: -5,
                    ..Default::default()
                }),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    run_as_user: Some(cri::Int64Value { value: 1000 }),
                    capabilities: Some(cri::Capability {
                        drop_capabilities: vec!["net_raw".into()],
                        add_capabilities: vec!["NET_ADMIN".into()],
                        ..Default::default()
                    }),
                    readonly_rootfs: true,
                    seccomp: Some(cri::SecurityProfile {
                        profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                        localhost_ref: String::new(),
                    }),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let g = gen(&c);
        let v = serde_json::to_value(&g.spec).expect("json");
        let env = v["process"]["env"].as_array().expect("env");
        assert!(env.contains(&json!("A=2")) && !env.contains(&json!("A=1")));
        assert!(env.contains(&json!("PATH=/img")));
        assert_eq!(v["process"]["user"]["uid"], 1000);
        assert_eq!(v["process"]["cwd"], "/w");
        let caps = v["process"]["capabilities"]["bounding"].to_string();
        assert!(caps.contains("CAP_NET_ADMIN") && !caps.contains("CAP_NET_RAW"));
        assert_eq!(v["root"]["readonly"], true);
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(v["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert!(v["linux"]["seccomp"]["syscalls"].is_array());
        assert_eq!(g.oom_score_adj, Some(-5));
        assert_eq!(g.stop_signal, libc::SIGQUIT);
        assert_eq!(g.cgroups_path, "/isola/cid");
        let restricted = generate(
            "cid",
            &c,
            &image(),
            tempfile::tempdir().expect("d").path(),
            &PodContext {
                cgroup_parent: "/kubepods/pod1".into(),
                ..Default::default()
            },
            &SpecOptions {
                restrict_oom_score_adj: true,
                systemd_cgroup: false,
            },
        )
        .expect("spec");
        assert_eq!(restricted.oom_score_adj, Some(0));
        assert_eq!(restricted.cgroups_path, "/kubepods/pod1/cid");
    }

    #[test]
    fn bad_input_names_the_field() {
        let c = cri::ContainerConfig {
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    capabilities: Some(cri::Capability {
                        add_capabilities: vec!["FLY".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let root = tempfile::tempdir().expect("root");
        let err = generate(
            "c",
            &c,
            &image(),
            root.path(),
            &PodContext::default(),
            &SpecOptions::default(),
        )
        .expect_err("bad cap");
        assert!(err.to_string().contains("FLY"));
        let c = cri::ContainerConfig {
            working_dir: "rel".into(),
            ..Default::default()
        };
        let err = generate(
            "c",
            &c,
            &image(),
            root.path(),
            &PodContext::default(),
            &SpecOptions::default(),
        )
        .expect_err("relative cwd");
        assert!(err.to_string().contains("working_dir"));
    }

    fn with_devices(devices: Vec<cri::Device>, privileged: bool) -> Result<Value, SpecError> {
        let c = cri::ContainerConfig {
            devices,
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    privileged,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let root = tempfile::tempdir().expect("root");
        let g = generate(
            "c",
            &c,
            &image(),
            root.path(),
            &PodContext::default(),
            &SpecOptions::default(),
        )?;
        Ok(serde_json::to_value(&g.spec).expect("json"))
    }

    fn dev(host: &str, container: &str, perms: &str) -> cri::Device {
        cri::Device {
            host_path: host.into(),
            container_path: container.into(),
            permissions: perms.into(),
        }
    }

    #[test]
    fn devices_become_nodes_and_cgroup_rules() {
        let v = with_devices(vec![dev("/dev/null", "/dev/isola-null", "rw")], false).expect("spec");
        let d = &v["linux"]["devices"][0];
        assert_eq!(
            (&d["path"], &d["type"], &d["major"], &d["minor"]),
            (&json!("/dev/isola-null"), &json!("c"), &json!(1), &json!(3))
        );
        let rules = v["linux"]["resources"]["devices"]
            .as_array()
            .expect("rules");
        assert_eq!(rules[0], json!({"allow": false, "access": "rwm"}));
        assert!(rules.contains(
            &json!({"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rw"})
        ));
        // Unprivileged containers get no host devices but the ones asked for.
        assert_eq!(v["linux"]["devices"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn bad_devices_name_the_device() {
        let err =
            with_devices(vec![dev("/dev/isola-nope", "/dev/x", "rw")], false).expect_err("missing");
        assert!(err.to_string().contains("/dev/isola-nope"), "{err}");
        let err = with_devices(vec![dev("/dev/null", "/dev/x", "rwx")], false)
            .expect_err("bad permissions");
        assert!(err.to_string().contains("permissions \"rwx\""), "{err}");
        let err = with_devices(vec![dev("/dev/null", "/dev/x", "rr")], false)
            .expect_err("repeated permission");
        assert!(err.to_string().contains("permissions"), "{err}");
        for bad in ["/tmp/x", "dev/x", "/dev/../etc/x", "/dev"] {
            let err = with_devices(vec![dev("/dev/null", bad, "r")], false)
                .expect_err("bad container path");
            assert!(err.to_string().contains("container_path"), "{bad}: {err}");
        }
        let err = with_devices(vec![dev("/etc/hostname", "/dev/x", "r")], false)
            .expect_err("not a device");
        assert!(err.to_string().contains("not a device node"), "{err}");
        let err = with_devices(vec![dev("relative", "/dev/x", "r")], false)
            .expect_err("relative host path");
        assert!(err.to_string().contains("host_path"), "{err}");
    }

    #[test]
    fn privileged_containers_get_the_host_devices() {
        let v = with_devices(vec![dev("/dev/null", "/dev/null", "r")], true).expect("spec");
        let devices = v["linux"]["devices"].as_array().expect("devices");
        let paths: Vec<&str> = devices.iter().filter_map(|d| d["path"].as_str()).collect();
        assert!(paths.contains(&"/dev/zero"), "{paths:?}");
        assert!(
            !paths.iter().any(|p| p.starts_with("/dev/pts/")),
            "{paths:?}"
        );
        assert!(!paths.contains(&"/dev/console"), "{paths:?}");
        assert_eq!(paths.iter().filter(|p| **p == "/dev/null").count(), 1);
        assert_eq!(
            v["linux"]["resources"]["devices"],
            json!([{"allow": true, "access": "rwm"}])
        );
        // Every capability the runtime holds, and none it lacks.
        let mut caps: Vec<String> =
            serde_json::from_value(v["process"]["capabilities"]["bounding"].clone()).expect("caps");
        caps.sort();
        let mut held = current_capabilities();
        held.sort();
        assert_eq!(caps, held);
        assert!(caps.iter().any(|c| c == "CAP_SYS_ADMIN"));
    }

    #[test]
    fn cgroup_v1_cgroupfs_binds_the_containers_own_cgroups() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/net_cls,net_prio rw,relatime - cgroup cgroup rw,net_cls,net_prio
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:32 / /mnt/memory rw,relatime - cgroup cgroup rw,memory
";
        let h = crate::cgroups::parse_v1_hierarchies(mountinfo);
        let points: Vec<_> = h.iter().map(|h| h.mount_point.to_str().unwrap()).collect();
        assert_eq!(
            points,
            [
                "/sys/fs/cgroup/cpu,cpuacct",
                "/sys/fs/cgroup/cpuset",
                "/sys/fs/cgroup/memory",
                "/sys/fs/cgroup/net_cls,net_prio"
            ]
        );
        assert_eq!(h[0].controllers, ["cpu", "cpuacct"]);

        let m = cgroup_v1_mounts(&h, "/kubepods/pod1/cid", "ro");
        assert_eq!(m[0]["destination"], "/sys/fs/cgroup");
        assert_eq!(m[0]["type"], "tmpfs");
        let binds: Vec<(String, String)> = m[1..]
            .iter()
            .map(|b| {
                assert_eq!(b["type"], "bind");
                assert!(b["options"].as_array().unwrap().contains(&json!("ro")));
                (
                    b["destination"].as_str().unwrap().to_owned(),
                    b["source"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let cpu = "/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/cid";
        let net = "/sys/fs/cgroup/net_cls,net_prio/kubepods/pod1/cid";
        let want = [
            ("/sys/fs/cgroup/cpu,cpuacct", cpu),
            ("/sys/fs/cgroup/cpu", cpu),
            ("/sys/fs/cgroup/cpuacct", cpu),
            (
                "/sys/fs/cgroup/cpuset",
                "/sys/fs/cgroup/cpuset/kubepods/pod1/cid",
            ),
            (
                "/sys/fs/cgroup/memory",
                "/sys/fs/cgroup/memory/kubepods/pod1/cid",
            ),
            ("/sys/fs/cgroup/net_cls,net_prio", net),
            ("/sys/fs/cgroup/net_cls", net),
            ("/sys/fs/cgroup/net_prio", net),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(binds, want);

        // The spec itself: the cgroup-type mount stays where it is right (cgroup v2,
        // systemd); on cgroup v1 with cgroupfs the tmpfs and binds replace it.
        let v = serde_json::to_value(&gen(&cri::ContainerConfig::default()).spec).expect("json");
        let mounts = v["mounts"].as_array().expect("mounts");
        let at = |d: &str| mounts.iter().find(|m| m["destination"] == d).cloned();
        let cg = at("/sys/fs/cgroup").expect("/sys/fs/cgroup");
        if crate::cgroups::is_v2() {
            assert_eq!(cg["type"], "cgroup");
        } else {
            assert_eq!(cg["type"], "tmpfs");
            assert!(v["linux"]["readonlyPaths"]
                .as_array()
                .unwrap()
                .contains(&json!("/sys/fs/cgroup")));
            if let Some(mem) = at("/sys/fs/cgroup/memory") {
                assert!(mem["source"]
                    .as_str()
                    .unwrap()
                    .ends_with("/memory/isola/cid"));
            }
        }
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("SIGTERM"), Some(15));
        assert_eq!(parse_signal("kill"), Some(9));
        assert_eq!(parse_signal("2"), Some(2));
        assert_eq!(parse_signal("SIGNOPE"), None);
        assert_eq!(parse_signal(""), None);
    }
}
