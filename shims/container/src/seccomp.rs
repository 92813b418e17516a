//! Seccomp profiles: the runtime's default, and Localhost profiles read from the host.
//!
//! The default profile allows by default and refuses (EPERM) the syscalls that let a
//! process reach beyond its container — kernel modules, kexec, reboot, clocks, keyrings,
//! mount and namespace manipulation, ptrace of others, bpf, perf — unless the container
//! holds the capability that legitimately grants that syscall (as Docker's profile
//! does). Docker's profile is an allow-list of ~350 syscalls; this deny-list form gives
//! the same protection against the listed escapes and keeps the table short enough to
//! review.

use serde_json::{json, Value};

/// Errors loading a profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A Localhost profile could not be read.
    #[error("seccomp profile {path}: {reason}")]
    Profile {
        /// The profile path.
        path: String,
        /// Why.
        reason: String,
    },
}

/// Syscalls refused unless a capability unlocks them: (capability, syscalls).
const GATED: &[(&str, &[&str])] = &[
    (
        "CAP_SYS_ADMIN",
        &[
            "mount",
            "umount2",
            "unshare",
            "setns",
            "pivot_root",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "open_tree",
            "move_mount",
            "mount_setattr",
            "quotactl",
            "quotactl_fd",
            "name_to_handle_at",
            "lookup_dcookie",
            "bpf",
            "perf_event_open",
            "fanotify_init",
        ],
    ),
    (
        "CAP_SYS_MODULE",
        &[
            "init_module",
            "finit_module",
            "delete_module",
            "create_module",
            "query_module",
            "get_kernel_syms",
        ],
    ),
    ("CAP_SYS_BOOT", &["reboot", "kexec_load", "kexec_file_load"]),
    (
        "CAP_SYS_TIME",
        &["settimeofday", "clock_settime", "clock_adjtime", "adjtimex"],
    ),
    (
        "CAP_SYS_PTRACE",
        &[
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "kcmp",
            "pidfd_getfd",
        ],
    ),
    ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
    ("CAP_SYS_PACCT", &["acct"]),
    (
        "CAP_SYS_NICE",
        &["get_mempolicy", "set_mempolicy", "mbind", "move_pages"],
    ),
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    ("CAP_SYSLOG", &["syslog"]),
];

/// Refused whatever the capabilities.
const ALWAYS: &[&str] = &[
    "add_key",
    "keyctl",
    "request_key",
    "swapon",
    "swapoff",
    "uselib",
    "userfaultfd",
    "ustat",
    "sysfs",
    "nfsservctl",
];

/// The runtime default profile (OCI seccomp JSON) for a container holding `caps`.
pub fn default_profile(caps: &[String]) -> Value {
    let mut names: Vec<&str> = ALWAYS.to_vec();
    for (cap, calls) in GATED {
        if !caps.iter().any(|c| c == cap) {
            names.extend_from_slice(calls);
        }
    }
    let mut syscalls = vec![json!({
        "names": names,
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": libc::EPERM,
    })];
    // clone3 can carry namespace flags that seccomp cannot inspect (a pointer): without
    // CAP_SYS_ADMIN it answers ENOSYS, so that libc falls back to clone(2), whose flags
    // are checked by the kernel's capability rules.
    if !caps.iter().any(|c| c == "CAP_SYS_ADMIN") {
        syscalls.push(json!({
            "names": ["clone3"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::ENOSYS,
        }));
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls,
    })
}

/// A Localhost profile: an OCI (or Docker-format) seccomp JSON file on the host.
pub fn localhost_profile(path: &str) -> Result<Value, SeccompError> {
    let err = |reason: String| SeccompError::Profile {
        path: path.to_owned(),
        reason,
    };
    if !path.starts_with('/') {
        return Err(err("a Localhost profile must be an absolute path".into()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut v: Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    if v.get("defaultAction").is_none() {
        return Err(err("no defaultAction".into()));
    }
    // Docker's format names architectures in `archMap`; OCI wants `architectures`.
    if v.get("architectures").is_none() {
        if let Some(map) = v.get("archMap").and_then(Value::as_array) {
            let archs: Vec<Value> = map
                .iter()
                .filter_map(|a| a.get("architecture").cloned())
                .collect();
            v["architectures"] = Value::Array(archs);
        }
    }
    if let Some(obj) = v.as_object_mut() {
        obj.remove("archMap");
        obj.remove("defaultErrno");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_unlock_their_syscalls() {
        let p = default_profile(&[]);
        let names = p["syscalls"][0]["names"].to_string();
        assert!(names.contains("\"mount\"") && names.contains("\"kexec_load\""));
        let p = default_profile(&["CAP_SYS_ADMIN".to_string()]);
        let names = p["syscalls"][0]["names"].to_string();
        assert!(!names.contains("\"mount\"") && names.contains("\"kexec_load\""));
        assert!(names.contains("\"keyctl\""));
    }

    #[test]
    fn localhost_profiles_are_checked() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("p.json");
        std::fs::write(&p, r#"{"defaultAction":"SCMP_ACT_ERRNO","archMap":[{"architecture":"SCMP_ARCH_X86_64"}],"syscalls":[]}"#).expect("write");
        let v = localhost_profile(p.to_str().expect("utf8")).expect("load");
        assert_eq!(v["architectures"][0], "SCMP_ARCH_X86_64");
        assert!(localhost_profile("relative.json").is_err());
        assert!(localhost_profile("/nonexistent/x.json").is_err());
    }
}
