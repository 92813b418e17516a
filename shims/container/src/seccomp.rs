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
    #[error("linux.security_context.seccomp: Localhost profile {path:?}: {reason}")]
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

/// A Localhost profile: an OCI (or Docker-format) seccomp JSON file on the host, for a
/// container holding `caps`.
///
/// Docker's format is accepted as CRI-O does: `archMap` gives the architectures, a rule's
/// `name` is a one-name `names`, and a rule whose `includes`/`excludes` (capabilities,
/// architectures) do not match this container is left out. The result is checked
/// against the OCI schema here, so that a bad profile is refused naming its path.
pub fn localhost_profile(path: &str, caps: &[String]) -> Result<Value, SeccompError> {
    let err = |reason: String| SeccompError::Profile {
        path: path.to_owned(),
        reason,
    };
    if !path.starts_with('/') {
        return Err(err("a Localhost profile must be an absolute path".into()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            err("no such file on the host".into())
        } else {
            err(e.to_string())
        }
    })?;
    let mut v: Value =
        serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(err("not a JSON object".into()));
    };
    if !obj.contains_key("defaultAction") {
        return Err(err("no defaultAction".into()));
    }
    // Docker's format names architectures in `archMap`; OCI wants `architectures`.
    if !obj.contains_key("architectures") {
        if let Some(map) = obj.get("archMap").and_then(Value::as_array) {
            let archs: Vec<Value> = map
                .iter()
                .filter_map(|a| a.get("architecture").cloned())
                .collect();
            obj.insert("architectures".into(), Value::Array(archs));
        }
    }
    obj.remove("archMap");
    obj.remove("defaultErrno");
    if let Some(rules) = obj.get_mut("syscalls") {
        let Some(list) = rules.as_array_mut() else {
            return Err(err("syscalls is not a list".into()));
        };
        let mut kept = Vec::with_capacity(list.len());
        for (i, rule) in list.drain(..).enumerate() {
            let Value::Object(mut rule) = rule else {
                return Err(err(format!("syscalls[{i}] is not an object")));
            };
            if !applies(rule.get("includes"), caps, true)
                || !applies(rule.get("excludes"), caps, false)
            {
                continue;
            }
            for k in ["includes", "excludes", "comment"] {
                rule.remove(k);
            }
            if !rule.contains_key("names") {
                if let Some(name) = rule.remove("name") {
                    rule.insert("names".into(), Value::Array(vec![name]));
                }
            }
            kept.push(Value::Object(rule));
        }
        *list = kept;
    }
    serde_json::from_value::<oci_spec::runtime::LinuxSeccomp>(v.clone())
        .map_err(|e| err(format!("not a valid seccomp profile: {e}")))?;
    Ok(v)
}

/// Whether a Docker `includes` (`want` true: every listed thing must match) or
/// `excludes` (`want` false: none may match) condition holds for this container.
fn applies(cond: Option<&Value>, caps: &[String], want: bool) -> bool {
    let Some(cond) = cond else { return true };
    let list = |k: &str| -> Vec<&str> {
        cond.get(k)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    };
    let our_arches = ["amd64", "x86_64", "SCMP_ARCH_X86_64"];
    let cap_held = |c: &&str| caps.iter().any(|h| h == c);
    let arch_ours = |a: &&str| our_arches.contains(a);
    let (cap_list, arch_list) = (list("caps"), list("arches"));
    if want {
        cap_list.iter().all(cap_held) && (arch_list.is_empty() || arch_list.iter().any(arch_ours))
    } else {
        !cap_list.iter().any(cap_held) && !arch_list.iter().any(arch_ours)
    }
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
        let v = localhost_profile(p.to_str().expect("utf8"), &[]).expect("load");
        assert_eq!(v["architectures"][0], "SCMP_ARCH_X86_64");
        assert!(localhost_profile("relative.json", &[]).is_err());
        let e = localhost_profile("/nonexistent/x.json", &[]).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/x.json"), "{e}");
        std::fs::write(&p, "{not json").expect("write");
        let e = localhost_profile(p.to_str().expect("utf8"), &[]).expect_err("malformed");
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        std::fs::write(&p, r#"{"defaultAction":"SCMP_ACT_FLY"}"#).expect("write");
        let e = localhost_profile(p.to_str().expect("utf8"), &[]).expect_err("bad action");
        assert!(e.to_string().contains("not a valid seccomp profile"), "{e}");
    }

    #[test]
    fn docker_rules_follow_their_conditions() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("docker.json");
        std::fs::write(
            &p,
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,"syscalls":[
                {"names":["read"],"action":"SCMP_ACT_ALLOW"},
                {"name":"mount","action":"SCMP_ACT_ALLOW","includes":{"caps":["CAP_SYS_ADMIN"]}},
                {"names":["ptrace"],"action":"SCMP_ACT_ALLOW","excludes":{"caps":["CAP_SYS_PTRACE"]}},
                {"names":["s390_pci_mmio_read"],"action":"SCMP_ACT_ALLOW","includes":{"arches":["s390x"]}}
            ]}"#,
        )
        .expect("write");
        let path = p.to_str().expect("utf8");
        let names = |v: &Value| v["syscalls"].to_string();
        let plain = localhost_profile(path, &[]).expect("load");
        assert!(names(&plain).contains("ptrace") && !names(&plain).contains("mount"));
        assert!(!names(&plain).contains("s390"));
        let admin = localhost_profile(
            path,
            &["CAP_SYS_ADMIN".to_string(), "CAP_SYS_PTRACE".to_string()],
        )
        .expect("load");
        assert!(names(&admin).contains("\"mount\"") && !names(&admin).contains("ptrace"));
        assert!(admin["syscalls"][1].get("includes").is_none());
    }
}
