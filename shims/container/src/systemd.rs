//! The systemd cgroup driver (kubelet's `--cgroup-driver=systemd`): the pod's cgroup is
//! a slice kubelet made (`kubepods-burstable-pod<uid>.slice`), and each container, and
//! the pod's infra process, is a transient scope `isola-<id>.scope` in it, as runc makes
//! `cri-containerd-<id>.scope` under containerd. libcontainer starts a container's
//! scope from the spec's `cgroupsPath` (`<slice>:isola:<id>`); this module names the
//! units and their cgroupfs paths, starts and stops the infra process's scope, and sets
//! a scope's properties on UpdateContainerResources (systemd re-applies its own view of
//! a unit's limits on daemon-reload, so writing the cgroup files alone would not last).

use std::path::PathBuf;
use std::time::Duration;

use isola_proto::cri;
use libcgroups::common::{CgroupManager, ControllerOpt};
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResources, LinuxResourcesBuilder,
};

/// The prefix of isola's scope units (`isola-<id>.scope`).
pub const SCOPE_PREFIX: &str = "isola";

/// Errors of the systemd driver.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    /// Not a slice name systemd accepts.
    #[error("cgroup_parent {0:?} is not a systemd slice name (<name>[-<name>...].slice, no '/', no empty part)")]
    InvalidSlice(String),
    /// systemd refused or could not be reached.
    #[error("systemd: {0}")]
    Systemd(String),
}

/// The cgroupfs path of a slice (`a-b.slice` → `/a.slice/a-b.slice`), as systemd lays
/// them out: each `-` is a level.
pub fn expand_slice(slice: &str) -> Result<String, SystemdError> {
    let invalid = || SystemdError::InvalidSlice(slice.to_owned());
    let name = slice.strip_suffix(".slice").ok_or_else(invalid)?;
    if name == "-" {
        return Ok("/".into());
    }
    if name.is_empty()
        || slice.contains('/')
        || slice.len() > 255
        || slice.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(invalid());
    }
    let mut path = String::new();
    let mut prefix = String::new();
    for part in name.split('-') {
        if part.is_empty() {
            return Err(invalid());
        }
        path.push_str(&format!("/{prefix}{part}.slice"));
        prefix.push_str(part);
        prefix.push('-');
    }
    Ok(path)
}

/// The scope unit of a container or of a pod's infra process.
pub fn scope_name(id: &str) -> String {
    format!("{SCOPE_PREFIX}-{id}.scope")
}

/// The OCI `cgroupsPath` libcontainer's systemd manager takes: `<slice>:isola:<id>`.
pub fn spec_path(slice: &str, id: &str) -> String {
    format!("{slice}:{SCOPE_PREFIX}:{id}")
}

/// The cgroupfs path (relative to the hierarchy root) of a cgroup named either way: a
/// systemd `<slice>:<prefix>:<name>` becomes `/<expanded slice>/<prefix>-<name>.scope`,
/// a bare slice its expansion; a cgroupfs path stays as it is.
pub fn fs_path(path: &str) -> String {
    let parts: Vec<&str> = path.split(':').collect();
    match parts.as_slice() {
        [slice, prefix, name] if slice.ends_with(".slice") => match expand_slice(slice) {
            Ok(p) => format!("{}/{prefix}-{name}.scope", p.trim_end_matches('/')),
            Err(_) => path.to_owned(),
        },
        [slice] if slice.ends_with(".slice") => {
            expand_slice(slice).unwrap_or_else(|_| path.to_owned())
        }
        _ => path.to_owned(),
    }
}

fn manager(slice: &str, id: &str) -> Result<libcgroups::systemd::manager::Manager, SystemdError> {
    libcgroups::systemd::manager::Manager::new(
        PathBuf::from("/sys/fs/cgroup"),
        PathBuf::from(spec_path(slice, id)),
        id.to_owned(),
        true,
        Duration::from_secs(5),
    )
    .map_err(|e| SystemdError::Systemd(e.to_string()))
}

/// Whether systemd runs this host (PID 1) and manages the unified hierarchy: the
/// systemd driver needs both.
pub fn available() -> bool {
    libcgroups::systemd::booted() && crate::cgroups::is_v2()
}

/// Puts `pid` into a new scope `isola-<id>.scope` in `slice` (systemd makes the slice
/// if nobody did). Returns the scope's cgroupfs path.
pub fn start_scope(slice: &str, id: &str, pid: i32) -> Result<String, SystemdError> {
    expand_slice(slice)?;
    let m = manager(slice, id)?;
    m.add_task(nix029::unistd::Pid::from_raw(pid))
        .map_err(|e| SystemdError::Systemd(format!("starting {}: {e}", scope_name(id))))?;
    Ok(fs_path(&spec_path(slice, id)))
}

/// Stops the scope (what is left in it is killed); a scope that is gone is stopped.
pub fn stop_scope(slice: &str, id: &str) -> Result<(), SystemdError> {
    let m = manager(slice, id)?;
    m.remove()
        .map_err(|e| SystemdError::Systemd(format!("stopping {}: {e}", scope_name(id))))
}

/// OCI resources for what UpdateContainerResources may change.
fn oci_resources(r: &cri::LinuxContainerResources) -> Result<LinuxResources, SystemdError> {
    let bad = |e: oci_spec::OciSpecError| SystemdError::Systemd(format!("resources: {e}"));
    let mut memory = LinuxMemoryBuilder::default();
    if r.memory_limit_in_bytes > 0 {
        memory = memory.limit(r.memory_limit_in_bytes);
    }
    let mut cpu = LinuxCpuBuilder::default();
    if r.cpu_shares > 0 {
        cpu = cpu.shares(r.cpu_shares as u64);
    }
    if r.cpu_quota != 0 {
        cpu = cpu.quota(r.cpu_quota);
    }
    if r.cpu_period > 0 {
        cpu = cpu.period(r.cpu_period as u64);
    }
    if !r.cpuset_cpus.is_empty() {
        cpu = cpu.cpus(r.cpuset_cpus.clone());
    }
    if !r.cpuset_mems.is_empty() {
        cpu = cpu.mems(r.cpuset_mems.clone());
    }
    LinuxResourcesBuilder::default()
        .memory(memory.build().map_err(bad)?)
        .cpu(cpu.build().map_err(bad)?)
        .build()
        .map_err(bad)
}

/// Sets new limits on a container's scope through systemd (UpdateContainerResources),
/// so that systemd's view of the unit matches its cgroup.
pub fn update_scope(
    slice: &str,
    id: &str,
    r: &cri::LinuxContainerResources,
) -> Result<(), SystemdError> {
    let resources = oci_resources(r)?;
    let m = manager(slice, id)?;
    m.apply(&ControllerOpt {
        resources: &resources,
        disable_oom_killer: false,
        oom_score_adj: None,
        freezer_state: None,
    })
    .map_err(|e| SystemdError::Systemd(format!("updating {}: {e}", scope_name(id))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_expand_as_systemd_lays_them_out() {
        assert_eq!(
            expand_slice("kubepods-burstable-pod12_ab.slice").unwrap(),
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_ab.slice"
        );
        assert_eq!(expand_slice("system.slice").unwrap(), "/system.slice");
        assert_eq!(expand_slice("-.slice").unwrap(), "/");
        for bad in [
            "kube--pods.slice",
            "-x.slice",
            "x-.slice",
            "a/b.slice",
            ".slice",
            "pods",
            "a b.slice",
        ] {
            assert!(expand_slice(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cgroups_paths_map_to_cgroupfs() {
        assert_eq!(
            fs_path("kubepods-besteffort-pod1.slice:isola:abc"),
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/isola-abc.scope"
        );
        assert_eq!(
            fs_path("system.slice:isola:abc"),
            "/system.slice/isola-abc.scope"
        );
        assert_eq!(fs_path("-.slice:isola:abc"), "/isola-abc.scope");
        assert_eq!(fs_path("kubepods.slice"), "/kubepods.slice");
        assert_eq!(fs_path("/kubepods/pod1/abc"), "/kubepods/pod1/abc");
        assert_eq!(scope_name("abc"), "isola-abc.scope");
        assert_eq!(spec_path("system.slice", "abc"), "system.slice:isola:abc");
    }
}
