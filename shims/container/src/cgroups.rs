//! Reading a container's cgroup: CPU, memory, pids, OOM kills; on cgroup v1 (per
//! controller hierarchies) and v2 (unified). Paths are cgroupfs paths relative to the
//! hierarchy root, as in the OCI spec's `cgroupsPath`.

use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

/// Usage figures of one cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Cumulative CPU time, ns.
    pub cpu_ns: u64,
    /// Memory in use, bytes.
    pub memory_usage: u64,
    /// Usage less inactive file cache, as kubelet's working set.
    pub working_set: u64,
    /// Anonymous memory.
    pub rss: u64,
    /// Page faults.
    pub page_faults: u64,
    /// Major page faults.
    pub major_page_faults: u64,
    /// Processes.
    pub pids: u64,
    /// OOM kills in this cgroup so far.
    pub oom_kills: u64,
}

/// Whether the host mounts the unified hierarchy at /sys/fs/cgroup.
pub fn is_v2() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

/// A cgroup v1 hierarchy mounted on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Hierarchy {
    /// Where the host mounts it, e.g. /sys/fs/cgroup/cpu,cpuacct.
    pub mount_point: PathBuf,
    /// Its controllers (from the super options), e.g. cpu, cpuacct.
    pub controllers: Vec<String>,
}

/// The controllers libcontainer's cgroup v1 manager puts a container in.
pub const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "hugetlb",
    "memory",
    "pids",
    "perf_event",
    "blkio",
    "net_prio",
    "net_cls",
    "freezer",
];

/// Mount point names under which libcgroups finds a controller's hierarchy (it
/// matches the last path component, as `Path::ends_with`).
fn v1_names(controller: &str) -> &'static [&'static str] {
    match controller {
        "cpu" => &["cpu,cpuacct", "cpu"],
        "cpuacct" => &["cpu,cpuacct", "cpuacct"],
        "net_cls" => &["net_cls,net_prio", "net_prio,net_cls", "net_cls"],
        "net_prio" => &["net_cls,net_prio", "net_prio,net_cls", "net_prio"],
        "cpuset" => &["cpuset"],
        "devices" => &["devices"],
        "hugetlb" => &["hugetlb"],
        "memory" => &["memory"],
        "pids" => &["pids"],
        "perf_event" => &["perf_event"],
        "blkio" => &["blkio"],
        "freezer" => &["freezer"],
        _ => &[],
    }
}

/// The cgroup v1 hierarchies in which libcontainer's v1 manager creates a container's
/// cgroup directory (`<mount point>/<cgroupsPath>`), from a mountinfo table: for each
/// of its controllers the first `cgroup` mount whose last path component names it (as
/// libcgroups looks it up) and whose super options hold it. Named hierarchies
/// (name=systemd) and the unified one are left out.
pub fn parse_v1_hierarchies(mountinfo: &str) -> Vec<V1Hierarchy> {
    let mounts: Vec<V1Hierarchy> = mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            if post.next()? != "cgroup" {
                return None;
            }
            let supers = post.nth(1)?;
            Some(V1Hierarchy {
                mount_point: PathBuf::from(mount_point),
                controllers: supers
                    .split(',')
                    .filter(|o| V1_CONTROLLERS.contains(o))
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect();
    let mut found: Vec<V1Hierarchy> = Vec::new();
    for c in V1_CONTROLLERS {
        let hit = mounts.iter().find(|m| {
            m.mount_point
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| v1_names(c).contains(&n))
        });
        if let Some(m) = hit {
            if m.controllers.iter().any(|x| x == c) && !found.contains(m) {
                found.push(m.clone());
            }
        }
    }
    found
}

/// The host's cgroup v1 hierarchies a container gets a cgroup in (see
/// [`parse_v1_hierarchies`]).
pub fn v1_hierarchies() -> Vec<V1Hierarchy> {
    parse_v1_hierarchies(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

fn read_u64(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn keyed(p: &Path, key: &str) -> u64 {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
        })
        .unwrap_or(0)
}

fn rel(path: &str) -> &str {
    path.trim_start_matches('/')
}

/// The directory of `path` in one v1 controller hierarchy.
pub fn v1_dir(controller: &str, path: &str) -> PathBuf {
    Path::new(ROOT).join(controller).join(rel(path))
}

/// Reads the usage of a cgroup.
pub fn usage(path: &str) -> Usage {
    if is_v2() {
        let d = Path::new(ROOT).join(rel(path));
        let usage = read_u64(&d.join("memory.current"));
        let stat = d.join("memory.stat");
        let inactive = keyed(&stat, "inactive_file");
        Usage {
            cpu_ns: keyed(&d.join("cpu.stat"), "usage_usec") * 1000,
            memory_usage: usage,
            working_set: usage.saturating_sub(inactive),
            rss: keyed(&stat, "anon"),
            page_faults: keyed(&stat, "pgfault"),
            major_page_faults: keyed(&stat, "pgmajfault"),
            pids: read_u64(&d.join("pids.current")),
            oom_kills: keyed(&d.join("memory.events"), "oom_kill"),
        }
    } else {
        let mem = v1_dir("memory", path);
        let usage = read_u64(&mem.join("memory.usage_in_bytes"));
        let stat = mem.join("memory.stat");
        let inactive = keyed(&stat, "total_inactive_file");
        let cpu = {
            let a = read_u64(&v1_dir("cpuacct", path).join("cpuacct.usage"));
            if a > 0 {
                a
            } else {
                read_u64(&v1_dir("cpu,cpuacct", path).join("cpuacct.usage"))
            }
        };
        Usage {
            cpu_ns: cpu,
            memory_usage: usage,
            working_set: usage.saturating_sub(inactive),
            rss: keyed(&stat, "total_rss"),
            page_faults: keyed(&stat, "total_pgfault"),
            major_page_faults: keyed(&stat, "total_pgmajfault"),
            pids: read_u64(&v1_dir("pids", path).join("pids.current")),
            oom_kills: keyed(&mem.join("memory.oom_control"), "oom_kill"),
        }
    }
}

/// Removes a cgroup directory (and empty children) in every hierarchy, deepest first.
/// Directories that still hold processes stay (the kernel refuses); that is reported.
pub fn remove(path: &str) -> Result<(), String> {
    let dirs: Vec<PathBuf> = if is_v2() {
        vec![Path::new(ROOT).join(rel(path))]
    } else {
        std::fs::read_dir(ROOT)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .map(|e| e.path().join(rel(path)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut failures = Vec::new();
    for d in dirs {
        if let Err(e) = remove_tree(&d) {
            failures.push(format!("{}: {e}", d.display()));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

fn remove_tree(d: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in entries.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_tree(&e.path())?;
        }
    }
    // cgroupfs directories are removed with rmdir even though they list files.
    match std::fs::remove_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Processes in a cgroup (v2: cgroup.procs; v1: the memory hierarchy's).
pub fn procs(path: &str) -> Vec<i32> {
    let file = if is_v2() {
        Path::new(ROOT).join(rel(path)).join("cgroup.procs")
    } else {
        v1_dir("memory", path).join("cgroup.procs")
    };
    std::fs::read_to_string(file)
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn write(p: &Path, v: &str) -> Result<(), String> {
    std::fs::write(p, v).map_err(|e| format!("{}: {e}", p.display()))
}

/// Applies new CPU and memory limits to a live cgroup (UpdateContainerResources).
pub fn update(path: &str, r: &isola_proto::cri::LinuxContainerResources) -> Result<(), String> {
    if is_v2() {
        let d = Path::new(ROOT).join(rel(path));
        if r.memory_limit_in_bytes > 0 {
            write(&d.join("memory.max"), &r.memory_limit_in_bytes.to_string())?;
        }
        if r.cpu_shares > 0 {
            // The kernel's conversion of cgroup v1 shares to v2 weight.
            let w = 1 + ((r.cpu_shares.clamp(2, 262_144) - 2) * 9999) / 262_142;
            write(&d.join("cpu.weight"), &w.to_string())?;
        }
        if r.cpu_quota != 0 || r.cpu_period > 0 {
            let quota = if r.cpu_quota > 0 {
                r.cpu_quota.to_string()
            } else {
                "max".into()
            };
            let period = if r.cpu_period > 0 {
                r.cpu_period
            } else {
                100_000
            };
            write(&d.join("cpu.max"), &format!("{quota} {period}"))?;
        }
        if !r.cpuset_cpus.is_empty() {
            write(&d.join("cpuset.cpus"), &r.cpuset_cpus)?;
        }
        if !r.cpuset_mems.is_empty() {
            write(&d.join("cpuset.mems"), &r.cpuset_mems)?;
        }
        for (k, v) in &r.unified {
            if k.contains('/') || k.contains("..") {
                return Err(format!("unified key {k:?} is not a cgroup file name"));
            }
            write(&d.join(k), v)?;
        }
    } else {
        if r.memory_limit_in_bytes > 0 {
            write(
                &v1_dir("memory", path).join("memory.limit_in_bytes"),
                &r.memory_limit_in_bytes.to_string(),
            )?;
        }
        let cpu = v1_dir("cpu", path);
        if r.cpu_shares > 0 {
            write(&cpu.join("cpu.shares"), &r.cpu_shares.to_string())?;
        }
        if r.cpu_period > 0 {
            write(&cpu.join("cpu.cfs_period_us"), &r.cpu_period.to_string())?;
        }
        if r.cpu_quota != 0 {
            write(&cpu.join("cpu.cfs_quota_us"), &r.cpu_quota.to_string())?;
        }
        if !r.cpuset_cpus.is_empty() {
            write(&v1_dir("cpuset", path).join("cpuset.cpus"), &r.cpuset_cpus)?;
        }
        if !r.cpuset_mems.is_empty() {
            write(&v1_dir("cpuset", path).join("cpuset.mems"), &r.cpuset_mems)?;
        }
    }
    Ok(())
}

/// Creates a cgroup in every hierarchy (v1: every controller but cpuset, whose new
/// groups start without CPUs) and moves `pid` into it. Best effort per hierarchy: the
/// failures are returned for the log.
pub fn enter(path: &str, pid: i32) -> Vec<String> {
    let mut failures = Vec::new();
    let dirs: Vec<PathBuf> = if is_v2() {
        vec![Path::new(ROOT).join(rel(path))]
    } else {
        std::fs::read_dir(ROOT)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .filter(|e| {
                        let n = e.file_name();
                        n != "cpuset" && n != "unified" && n != "systemd"
                    })
                    .map(|e| e.path().join(rel(path)))
                    .collect()
            })
            .unwrap_or_default()
    };
    for d in dirs {
        if let Err(e) = std::fs::create_dir_all(&d) {
            failures.push(format!("{}: {e}", d.display()));
            continue;
        }
        if let Err(e) = write(&d.join("cgroup.procs"), &pid.to_string()) {
            failures.push(e);
        }
    }
    failures
}

/// On cgroup v2, the OOM kill count of the cgroup's parent and whether the cgroup itself
/// still exists. `memory.events` counts hierarchically, so a parent's count that grew
/// over a child's life tells of an OOM kill below it, when the child's own file went
/// with its cgroup before it could be read (systemd removes an empty scope at once).
/// None on v1 or when the parent cannot be read.
pub fn parent_oom_kills(path: &str) -> Option<(u64, bool)> {
    if !is_v2() {
        return None;
    }
    let dir = Path::new(ROOT).join(rel(path));
    let events = dir.parent()?.join("memory.events");
    let text = std::fs::read_to_string(events).ok()?;
    let count = text
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())?;
    Some((count, dir.is_dir()))
}

/// Counts the OOM kills of a cgroup v2 while it lives, from `memory.events`
/// notifications (inotify), until `stop` is set or the cgroup is removed. Under the
/// systemd driver the scope's cgroup is gone as soon as its last process is: reading
/// `memory.events` after the container's exit would find nothing. Returns the latest
/// count seen (0 on cgroup v1 or when the file cannot be watched).
pub fn watch_oom_kills(
    path: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
    use std::os::unix::ffi::OsStrExt;
    use std::sync::atomic::Ordering;
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    if !is_v2() {
        return seen;
    }
    let file = Path::new(ROOT).join(rel(path)).join("memory.events");
    let Ok(cpath) = std::ffi::CString::new(file.as_os_str().as_bytes()) else {
        return seen;
    };
    // SAFETY: inotify_init1 takes flags only; the fd is owned below.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd < 0 {
        return seen;
    }
    // SAFETY: fd is a valid inotify fd from above.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    // SAFETY: a valid fd and a NUL-terminated path.
    let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), cpath.as_ptr(), libc::IN_MODIFY) };
    if wd < 0 {
        return seen;
    }
    let out = seen.clone();
    let spawned = std::thread::Builder::new()
        .name("oom-watch".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                out.fetch_max(keyed(&file, "oom_kill"), Ordering::SeqCst);
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, 1 s timeout.
                let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
                if n > 0 {
                    // SAFETY: reading into a buffer of the given length.
                    let len =
                        unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if len > 0 {
                        // IN_IGNORED: the watch is gone with the cgroup.
                        let mask = u32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
                        if mask & libc::IN_IGNORED != 0 {
                            return;
                        }
                    }
                }
            }
        });
    if spawned.is_err() {
        seen.store(0, Ordering::SeqCst);
    }
    seen
}
