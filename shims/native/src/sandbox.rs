//! The pod sandbox of a native pod: its files (/etc/hosts, /etc/hostname,
//! /etc/resolv.conf), its /dev/shm, its infra process holding the shared namespaces, and
//! its cgroup.

use std::io::BufRead;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use isola_container::spec::PodContext;
use isola_proto::cri;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use tracing::{info, warn};

/// Errors building a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The pod config asks for something impossible.
    #[error("{0}")]
    Invalid(String),
    /// A step failed.
    #[error("{what}: {detail}")]
    Failed {
        /// The step.
        what: &'static str,
        /// Why.
        detail: String,
    },
}

fn failed(what: &'static str, e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Failed {
        what,
        detail: e.to_string(),
    }
}

/// A built sandbox.
#[derive(Debug)]
pub struct Sandbox {
    /// The pod's config.
    pub config: cri::PodSandboxConfig,
    /// The shim's state directory for the pod.
    pub state_dir: PathBuf,
    /// The infra process holding the namespaces (0 when every namespace is the host's).
    pub infra_pid: i32,
    /// The process the shim started (the infra, or its launcher with a PID namespace).
    pub infra_child: Option<std::process::Child>,
    /// What containers join.
    pub ctx: PodContext,
    /// The pod cgroup containers go under.
    pub cgroup_parent: String,
    /// Cgroups this shim created and removes at stop.
    pub own_cgroups: Vec<String>,
    /// The shm tmpfs this shim mounted.
    pub shm_mount: Option<PathBuf>,
    /// The infra process's systemd scope (slice, id), under the systemd driver.
    pub infra_scope: Option<(String, String)>,
}

fn mode(
    ns: Option<&cri::NamespaceOption>,
    f: impl Fn(&cri::NamespaceOption) -> i32,
) -> cri::NamespaceMode {
    ns.map(|n| cri::NamespaceMode::try_from(f(n)).unwrap_or(cri::NamespaceMode::Pod))
        .unwrap_or(cri::NamespaceMode::Pod)
}

fn write_file(path: &Path, content: &str) -> Result<(), SandboxError> {
    std::fs::write(path, content)
        .map_err(|e| failed("writing pod file", format!("{}: {e}", path.display())))
}

fn resolv_conf(dns: Option<&cri::DnsConfig>) -> String {
    match dns {
        Some(d) if !(d.servers.is_empty() && d.searches.is_empty() && d.options.is_empty()) => {
            let mut s = String::new();
            if !d.searches.is_empty() {
                s.push_str(&format!("search {}\n", d.searches.join(" ")));
            }
            for n in &d.servers {
                s.push_str(&format!("nameserver {n}\n"));
            }
            if !d.options.is_empty() {
                s.push_str(&format!("options {}\n", d.options.join(" ")));
            }
            s
        }
        _ => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    }
}

impl Sandbox {
    /// Builds the sandbox. On failure everything done so far is undone.
    pub fn create(
        sandbox_id: &str,
        config: cri::PodSandboxConfig,
        state_dir: &Path,
        netns_path: &str,
        pod_ips: &[String],
    ) -> Result<Sandbox, SandboxError> {
        let linux = config.linux.clone().unwrap_or_default();
        let ns = linux
            .security_context
            .as_ref()
            .and_then(|s| s.namespace_options.as_ref());
        let host_net = mode(ns, |n| n.network) == cri::NamespaceMode::Node;
        let host_ipc = mode(ns, |n| n.ipc) == cri::NamespaceMode::Node;
        let pid_mode = mode(ns, |n| n.pid);
        let host_pid = pid_mode == cri::NamespaceMode::Node;
        let pod_pid = pid_mode == cri::NamespaceMode::Pod;
        let hostname = if host_net {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else if !config.hostname.is_empty() {
            config.hostname.clone()
        } else {
            config
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default()
        };
        if hostname.len() > 64 {
            return Err(SandboxError::Invalid(format!(
                "config.hostname {hostname:?} is longer than 64 bytes"
            )));
        }
        std::fs::create_dir_all(state_dir).map_err(|e| failed("creating pod state dir", e))?;
        let mut sb = Sandbox {
            config: config.clone(),
            state_dir: state_dir.to_owned(),
            infra_pid: 0,
            infra_child: None,
            ctx: PodContext {
                hostname: hostname.clone(),
                host_pid,
                sysctls: linux.sysctls.clone(),
                ..Default::default()
            },
            cgroup_parent: String::new(),
            own_cgroups: Vec::new(),
            shm_mount: None,
            infra_scope: None,
        };
        match sb.build(
            sandbox_id,
            &config,
            host_net,
            host_ipc,
            pod_pid,
            (netns_path, pod_ips),
        ) {
            Ok(()) => Ok(sb),
            Err(e) => {
                sb.destroy();
                Err(e)
            }
        }
    }

    fn build(
        &mut self,
        sandbox_id: &str,
        config: &cri::PodSandboxConfig,
        host_net: bool,
        host_ipc: bool,
        pod_pid: bool,
        // The pod's network namespace (empty: a new one) and its IPs from CNI.
        (netns_path, pod_ips): (&str, &[String]),
    ) -> Result<(), SandboxError> {
        let dir = self.state_dir.clone();
        // Files.
        let hosts = dir.join("hosts");
        if host_net {
            let text = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
            write_file(&hosts, &text)?;
        } else {
            // The pod's own addresses name it (as kubelet's managed hosts file does);
            // without a pod network, 127.0.1.1 (as Debian does).
            let own: String = if pod_ips.is_empty() {
                format!("127.0.1.1\t{}\n", self.ctx.hostname)
            } else {
                pod_ips
                    .iter()
                    .map(|ip| format!("{ip}\t{}\n", self.ctx.hostname))
                    .collect()
            };
            write_file(
                &hosts,
                &format!(
                    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n{own}",
                ),
            )?;
        }
        let hostname_file = dir.join("hostname");
        write_file(&hostname_file, &format!("{}\n", self.ctx.hostname))?;
        let resolv = dir.join("resolv.conf");
        write_file(&resolv, &resolv_conf(config.dns_config.as_ref()))?;
        self.ctx.etc_hosts = Some(hosts);
        self.ctx.etc_hostname = Some(hostname_file);
        self.ctx.resolv_conf = Some(resolv);

        // /dev/shm shared by the pod's containers.
        if host_ipc {
            self.ctx.shm = Some(PathBuf::from("/dev/shm"));
        } else {
            let shm = dir.join("shm");
            std::fs::create_dir_all(&shm).map_err(|e| failed("creating shm dir", e))?;
            mount(
                Some("shm"),
                &shm,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("mode=1777,size=65536k"),
            )
            .map_err(|e| failed("mounting the pod's /dev/shm", e))?;
            self.shm_mount = Some(shm.clone());
            self.ctx.shm = Some(shm);
        }

        // The infra process and its namespaces.
        let mut flags = CloneFlags::empty();
        let netns_file = if host_net || netns_path.is_empty() {
            if !host_net {
                flags |= CloneFlags::CLONE_NEWNET;
            }
            None
        } else {
            Some(std::fs::File::open(netns_path).map_err(|e| {
                failed(
                    "opening the pod's network namespace",
                    format!("{netns_path}: {e}"),
                )
            })?)
        };
        if !host_ipc {
            flags |= CloneFlags::CLONE_NEWIPC;
        }
        if !host_net {
            flags |= CloneFlags::CLONE_NEWUTS;
        }
        if pod_pid {
            flags |= CloneFlags::CLONE_NEWPID;
        }
        if !flags.is_empty() || netns_file.is_some() {
            let exe = std::env::current_exe().map_err(|e| failed("finding the shim binary", e))?;
            let mut cmd = Command::new(exe);
            // The id lets the agent recognise this process if the shim dies.
            cmd.arg("pause").arg("--id").arg(sandbox_id);
            if !host_net {
                cmd.arg("--hostname").arg(&self.ctx.hostname);
            }
            if pod_pid {
                cmd.arg("--pidns");
            }
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let netns_fd = netns_file.as_ref().map(|f| f.as_raw_fd());
            // SAFETY: the closure runs between fork and exec and calls only setns(2) and
            // unshare(2), which are async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    if let Some(fd) = netns_fd {
                        if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    if libc::unshare(flags.bits()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| failed("starting the infra process", e))?;
            let line = child
                .stdout
                .take()
                .and_then(|out| std::io::BufReader::new(out).lines().next())
                .and_then(|l| l.ok())
                .unwrap_or_default();
            self.infra_child = Some(child);
            self.infra_pid = line.trim().parse().map_err(|_| {
                failed(
                    "starting the infra process",
                    format!("it printed {line:?}, not a pid"),
                )
            })?;
            let ns_path = |n: &str| Some(PathBuf::from(format!("/proc/{}/ns/{n}", self.infra_pid)));
            if !host_net {
                self.ctx.netns = ns_path("net");
                self.ctx.utsns = ns_path("uts");
            }
            if !host_ipc {
                self.ctx.ipcns = ns_path("ipc");
            }
            if pod_pid {
                self.ctx.pidns = ns_path("pid");
            }
            info!(
                infra_pid = self.infra_pid,
                "infra process holds the pod namespaces"
            );
        }

        // Cgroup: kubelet's pod cgroup, or one of our own.
        let parent = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap_or_default();
        if parent.is_empty() {
            let own = format!("/isola/{sandbox_id}");
            self.own_cgroups.push(own.clone());
            self.cgroup_parent = own;
        } else {
            self.cgroup_parent = parent;
        }
        self.ctx.cgroup_parent = self.cgroup_parent.clone();
        let slice = self.cgroup_parent.ends_with(".slice");
        if self.infra_pid > 0 && slice && isola_container::systemd::available() {
            // The systemd driver: the infra process (the pod's pause) gets a scope in
            // the pod's slice, as the containers do.
            let cg = isola_container::systemd::start_scope(
                &self.cgroup_parent,
                sandbox_id,
                self.infra_pid,
            )
            .map_err(|e| failed("placing the infra process in the pod slice", e))?;
            info!(cgroup = %cg, "infra process in its systemd scope");
            self.infra_scope = Some((self.cgroup_parent.clone(), sandbox_id.to_owned()));
        } else if self.infra_pid > 0 {
            // A slice without systemd managing cgroups (cgroup v1): its cgroupfs path.
            let infra_cg = format!(
                "{}/infra-{}",
                isola_container::systemd::fs_path(&self.cgroup_parent).trim_end_matches('/'),
                &sandbox_id[..12.min(sandbox_id.len())]
            );
            for f in isola_container::cgroups::enter(&infra_cg, self.infra_pid) {
                warn!(error = %f, "placing the infra process in the pod cgroup");
            }
            self.own_cgroups.insert(0, infra_cg);
        }
        Ok(())
    }

    /// Kills the infra process, unmounts /dev/shm, removes own cgroups. Idempotent.
    pub fn destroy(&mut self) {
        if let Some(mut child) = self.infra_child.take() {
            if self.infra_pid > 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.infra_pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some((slice, id)) = self.infra_scope.take() {
            if let Err(e) = isola_container::systemd::stop_scope(&slice, &id) {
                warn!(error = %e, "stopping the infra process's scope");
            }
        }
        if let Some(shm) = self.shm_mount.take() {
            if let Err(e) = umount2(&shm, MntFlags::MNT_DETACH) {
                warn!(error = %e, "unmounting the pod's /dev/shm");
            }
        }
        // The kernel removes a cgroup only once its last process is gone: give the
        // killed processes a moment.
        for cg in std::mem::take(&mut self.own_cgroups) {
            let mut result = Err(String::new());
            for _ in 0..50 {
                result = isola_container::cgroups::remove(&cg);
                if result.is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            if let Err(e) = result {
                warn!(cgroup = %cg, error = %e, "removing the pod cgroup");
            }
        }
    }
}
