//! RunPodSandbox: validate, reserve the pod's name, start its shim, have the shim build
//! the sandbox, record it. Every step done is undone if a later one fails.

use std::sync::Arc;

use isola_proto::cri;
use isola_proto::shim::CreateSandboxRequest;
use prost::Message;
use tracing::Span;

use super::CriError;
use crate::classes::ShimKind;
use crate::config::CgroupDriver;
use crate::ids::new_id;
use crate::records::{sandbox_name, SandboxRecord, SandboxState};
use crate::rollback::Rollback;
use crate::runtime::{now_ns, Runtime};
use crate::shim;

/// How long a shim may take to build a sandbox (a VM boot included).
const CREATE_SANDBOX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Checks what the CRI requires of a RunPodSandbox request, naming the bad field.
pub fn validate(req: &cri::RunPodSandboxRequest) -> Result<&cri::PodSandboxConfig, CriError> {
    let config = req
        .config
        .as_ref()
        .ok_or_else(|| CriError::InvalidArgument("config is required".into()))?;
    let md = config
        .metadata
        .as_ref()
        .ok_or_else(|| CriError::InvalidArgument("config.metadata is required".into()))?;
    for (field, value) in [
        ("name", &md.name),
        ("namespace", &md.namespace),
        ("uid", &md.uid),
    ] {
        if value.is_empty() {
            return Err(CriError::InvalidArgument(format!(
                "config.metadata.{field} must not be empty"
            )));
        }
        // They travel to CNI plugins in CNI_ARGS (`K=V;K=V`): a `;` or `=` would smuggle
        // in arguments of the client's choosing (an IP for static IPAM, say).
        if value.contains([';', '=']) || value.chars().any(char::is_control) {
            return Err(CriError::InvalidArgument(format!(
                "config.metadata.{field} {value:?} must not contain ';', '=' or control characters"
            )));
        }
    }
    if md.attempt > u32::MAX / 2 {
        return Err(CriError::InvalidArgument(
            "config.metadata.attempt is out of range".into(),
        ));
    }
    if let Some(linux) = &config.linux {
        if !linux.cgroup_parent.is_empty()
            && !linux.cgroup_parent.starts_with('/')
            && !linux.cgroup_parent.ends_with(".slice")
        {
            return Err(CriError::InvalidArgument(format!(
                "config.linux.cgroup_parent {:?} must be an absolute cgroupfs path or a systemd slice",
                linux.cgroup_parent
            )));
        }
    }
    Ok(config)
}

/// Checks the pod's cgroup parent against the configured cgroup driver (kubelet and the
/// runtime must agree, as kubelet's `--cgroup-driver` and containerd's `SystemdCgroup`
/// do) and returns the parent for a native pod: under the systemd driver a pod without
/// one goes in system.slice (as CRI-O's default), under cgroupfs isola makes its own.
pub fn cgroup_parent(
    config: &cri::PodSandboxConfig,
    driver: CgroupDriver,
) -> Result<String, CriError> {
    let parent = config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.as_str())
        .unwrap_or_default();
    match driver {
        CgroupDriver::Systemd if parent.is_empty() => Ok("system.slice".into()),
        CgroupDriver::Systemd => {
            isola_container::systemd::expand_slice(parent).map_err(|_| {
                CriError::InvalidArgument(format!(
                    "config.linux.cgroup_parent {parent:?}: isolad's cgroup_driver is systemd, which wants a slice name (kubepods-besteffort-pod<uid>.slice); a cgroupfs path means kubelet runs --cgroup-driver=cgroupfs: make them match"
                ))
            })?;
            Ok(parent.to_owned())
        }
        CgroupDriver::Cgroupfs if parent.ends_with(".slice") => Err(CriError::InvalidArgument(format!(
            "config.linux.cgroup_parent {parent:?} is a systemd slice but isolad's cgroup_driver is cgroupfs: set cgroup_driver = \"systemd\" in isolad's config to match kubelet's --cgroup-driver=systemd"
        ))),
        CgroupDriver::Cgroupfs => Ok(parent.to_owned()),
    }
}

/// Refuses what a VM cannot honour, rather than silently running without it.
fn validate_for_vm(config: &cri::PodSandboxConfig) -> Result<(), CriError> {
    let ns = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref());
    if let Some(ns) = ns {
        for (what, mode) in [("network", ns.network), ("pid", ns.pid), ("ipc", ns.ipc)] {
            if mode == cri::NamespaceMode::Node as i32 {
                return Err(CriError::InvalidArgument(format!(
                    "config.linux.security_context.namespace_options.{what} is NODE (host {what}): a vm pod runs in its own kernel and cannot share the host's {what} namespace; use the native runtime class"
                )));
            }
        }
    }
    Ok(())
}

impl Runtime {
    /// RunPodSandbox.
    pub async fn run_pod_sandbox(
        self: &Arc<Self>,
        req: cri::RunPodSandboxRequest,
    ) -> Result<cri::RunPodSandboxResponse, CriError> {
        let mut config = validate(&req)?.clone();
        let parent = cgroup_parent(&config, self.config.cgroup_driver)?;
        let class = self.classes.resolve(&req.runtime_handler)?.clone();
        if class.shim == ShimKind::Vm {
            validate_for_vm(&config)?;
        } else {
            // The native shim puts the pod's scopes in the slice; a vm pod without a
            // parent keeps the cgroup its shim makes for the VMM.
            config
                .linux
                .get_or_insert_with(Default::default)
                .cgroup_parent = parent;
        }
        let md = config.metadata.clone().unwrap_or_default();
        let id = new_id();
        Span::current().record("id", id.as_str());
        let name = sandbox_name(&md);
        self.records.reserve_name(&name, &id).map_err(|holder| {
            CriError::AlreadyExists(format!(
                "pod sandbox {name} (name_namespace_uid_attempt) already exists with id {holder}"
            ))
        })?;
        let mut undo = Rollback::new();
        {
            let rt = Arc::clone(self);
            let (name, id) = (name.clone(), id.clone());
            undo.push("release pod name", async move {
                rt.records.release_name(&name, &id)
            });
        }
        let _guard = self.lock_pod(&id).await;
        match self.build_sandbox(&id, &config, &class, &mut undo).await {
            Ok((record, client)) => {
                let shim_record = record.shim.clone();
                if let Err(e) = self.records.put_sandbox(record).await {
                    undo.run().await;
                    self.forget_pod(&id);
                    return Err(e.into());
                }
                undo.commit();
                if let Some(s) = shim_record {
                    self.adopt_shim(&id, client, s);
                }
                self.emit_sandbox_event(&id, cri::ContainerEventType::ContainerCreatedEvent);
                self.emit_sandbox_event(&id, cri::ContainerEventType::ContainerStartedEvent);
                Ok(cri::RunPodSandboxResponse { pod_sandbox_id: id })
            }
            Err(e) => {
                undo.run().await;
                self.forget_pod(&id);
                Err(e)
            }
        }
    }

    async fn build_sandbox(
        self: &Arc<Self>,
        id: &str,
        config: &cri::PodSandboxConfig,
        class: &crate::classes::RuntimeClass,
        undo: &mut Rollback,
    ) -> Result<(SandboxRecord, shim::Client), CriError> {
        let state_dir = self.config.pod_state_dir(id);
        let dir = state_dir.clone();
        tokio::task::spawn_blocking(move || std::fs::create_dir_all(&dir))
            .await
            .map_err(|e| CriError::Internal(format!("creating pod state dir: {e}")))?
            .map_err(|e| {
                CriError::Internal(format!(
                    "creating pod state dir {}: {e}",
                    state_dir.display()
                ))
            })?;
        {
            let dir = state_dir.clone();
            undo.push("remove pod state dir", async move {
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
            });
        }
        let (netns_path, ips) = self.setup_network(id, config, undo).await?;
        let socket = self.config.shim_socket(id);
        if socket.exists() {
            // 64 random bits collided with a live pod's socket name: refuse, do not steal.
            return Err(CriError::Internal(format!(
                "shim socket {} is in use; retry",
                socket.display()
            )));
        }
        let mut started = self
            .shims
            .spawn(class.shim, id, &state_dir, &socket)
            .await?;
        // Written before anything else depends on the shim, so that an agent crash before
        // the record is committed leaves enough to find and kill this shim.
        let ident = serde_json::to_vec(&started.record)
            .map_err(|e| CriError::Internal(format!("encoding shim identity: {e}")))?;
        std::fs::write(state_dir.join("shim.json"), ident)
            .map_err(|e| CriError::Internal(format!("writing shim identity: {e}")))?;
        {
            let rec = started.record.clone();
            let mut client = started.client.clone();
            undo.push("stop shim", async move {
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    client.shutdown(isola_proto::shim::ShutdownRequest { now: true }),
                )
                .await;
                if tokio::time::timeout(std::time::Duration::from_secs(5), shim::wait_exit(&rec))
                    .await
                    .is_err()
                {
                    shim::kill(&rec, nix::sys::signal::Signal::SIGKILL);
                    shim::wait_exit(&rec).await;
                }
                let _ = std::fs::remove_file(&rec.socket);
            });
        }
        let cgroup_parent = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap_or_default();
        let resp = tokio::time::timeout(
            CREATE_SANDBOX_TIMEOUT,
            started.client.create_sandbox(CreateSandboxRequest {
                sandbox_id: id.to_owned(),
                pod_config: config.encode_to_vec(),
                netns_path: netns_path.clone(),
                cgroup_parent,
                runtime_handler: class.handler.clone(),
                class_settings_json: class.settings_json(),
                state_dir: state_dir.display().to_string(),
                pod_ips: ips.clone(),
            }),
        )
        .await
        .map_err(|_| {
            CriError::DeadlineExceeded(format!(
                "the shim did not build the sandbox within {}s",
                CREATE_SANDBOX_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|s| CriError::from(shim::ShimError::call("CreateSandbox", s)))?
        .into_inner();
        let mut info: std::collections::BTreeMap<String, String> = resp.info.into_iter().collect();
        info.insert("pid".into(), resp.pid.to_string());
        if !resp.cgroup_path.is_empty() {
            info.insert("cgroupPath".into(), resp.cgroup_path.clone());
        }
        let record = SandboxRecord {
            id: id.to_owned(),
            config: config.clone(),
            runtime_handler: class.handler.clone(),
            shim_kind: class.shim,
            state: SandboxState::Ready,
            reason: String::new(),
            created_at_ns: now_ns(),
            shim: Some(started.record),
            netns_path,
            ip: ips.first().cloned().unwrap_or_default(),
            additional_ips: ips.iter().skip(1).cloned().collect(),
            info,
        };
        Ok((record, started.client))
    }
}

/// Whether a pod shares the host's network namespace.
pub fn host_network(config: &cri::PodSandboxConfig) -> bool {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .is_some_and(|n| n.network == cri::NamespaceMode::Node as i32)
}

impl Runtime {
    /// The pod's network: its own namespace attached by CNI (returns the namespace path
    /// and the pod IPs); nothing for hostNetwork pods; while the conf dir holds no
    /// network config at all, a namespace of its own with only loopback (logged; the pod
    /// has no IP). A conf dir whose configs are all invalid fails the pod instead, naming
    /// each file's problem.
    async fn setup_network(
        self: &Arc<Self>,
        id: &str,
        config: &cri::PodSandboxConfig,
        undo: &mut Rollback,
    ) -> Result<(String, Vec<String>), CriError> {
        if host_network(config) {
            return Ok((String::new(), vec![]));
        }
        let list = match self.network.current() {
            Ok(l) => {
                let pod_cidr = self
                    .records
                    .meta(super::status::META_POD_CIDR)
                    .ok()
                    .flatten();
                Some(
                    l.with_pod_cidr(pod_cidr.as_deref())
                        .map_err(crate::network::NetworkError::from)?,
                )
            }
            Err(crate::network::conf::ConfError::NoConfig(dir)) => {
                tracing::warn!(
                    conf_dir = %dir.display(),
                    "no CNI network config: the pod gets a network namespace with only loopback and no IP"
                );
                None
            }
            Err(e) => return Err(crate::network::NetworkError::from(e).into()),
        };
        let netns = self.network.create_netns(id).await?;
        {
            let rt = Arc::clone(self);
            let path = netns.clone();
            undo.push("remove netns", async move {
                if let Err(e) = rt.network.remove_netns(&path).await {
                    tracing::warn!(error = %e, "undo: removing the pod's network namespace");
                }
            });
        }
        let Some(list) = list else {
            return Ok((netns.display().to_string(), vec![]));
        };
        {
            let rt = Arc::clone(self);
            let id = id.to_owned();
            undo.push("CNI DEL", async move {
                if let Err(e) = rt.network.del(&id).await {
                    // Nothing could retry it later: the pod never existed for the client.
                    tracing::warn!(error = %e, "undo: CNI DEL failed; forgetting the attachment");
                    rt.network.forget(&id).await;
                }
            });
        }
        let pod = crate::network::PodInfo::from_config(id, config);
        let t = std::time::Instant::now();
        let ips = self.network.add(&list, &pod, &netns).await?;
        tracing::info!(
            network = %list.name,
            ips = ?ips,
            ms = t.elapsed().as_millis() as u64,
            "pod network attached"
        );
        Ok((netns.display().to_string(), ips))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(parent: &str) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: parent.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_cgroup_parent_must_fit_the_driver() {
        use CgroupDriver::{Cgroupfs, Systemd};
        let ok = |p: &str, d| cgroup_parent(&pod(p), d).expect(p);
        assert_eq!(ok("", Systemd), "system.slice");
        assert_eq!(
            ok("kubepods-besteffort-pod1_2.slice", Systemd),
            "kubepods-besteffort-pod1_2.slice"
        );
        assert_eq!(ok("", Cgroupfs), "");
        assert_eq!(ok("/kubepods/pod1", Cgroupfs), "/kubepods/pod1");
        assert_eq!(
            cgroup_parent(&cri::PodSandboxConfig::default(), Systemd).unwrap(),
            "system.slice"
        );
        for (p, d) in [
            ("/kubepods/pod1", Systemd),
            ("kube--pods.slice", Systemd),
            ("a/b.slice", Systemd),
            ("kubepods.slice", Cgroupfs),
        ] {
            match cgroup_parent(&pod(p), d) {
                Err(CriError::InvalidArgument(m)) => {
                    assert!(
                        m.contains("cgroup_parent") && m.contains("cgroup_driver"),
                        "{m}"
                    )
                }
                other => panic!("{p} {d:?}: {other:?}"),
            }
        }
    }
}
