//! Pod networking through CNI (spec 1.0): each pod's network namespace, pinned under
//! `<state>/netns/<pod-id>`, is attached to the first valid network config list of the
//! conf dir by running its plugins (ADD in order, DEL in reverse, CHECK in order), with
//! the results kept under `<root>/cni/results` for DEL and CHECK.
//!
//! - [`netns`]: creating and removing the pinned namespaces;
//! - [`conf`]: finding and checking network configs, filling in runtime config;
//! - [`exec`]: running one plugin;
//! - [`cache`]: the on-disk record of each attachment.

pub mod cache;
pub mod conf;
pub mod exec;
pub mod netns;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isola_proto::cri;
use serde_json::{json, Value};
use tracing::{debug, info, warn, Instrument};

use crate::config::Config;
use cache::{Attachment, Cache};
use conf::{ConfError, NetConfList, RuntimeConf};
use exec::{Command, ExecError, Invocation};

/// The interface name every pod gets.
pub const IFNAME: &str = "eth0";

/// Errors of pod networking.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// No usable network config.
    #[error(transparent)]
    Conf(#[from] ConfError),
    /// Creating or removing the namespace failed.
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    /// A plugin failed.
    #[error("network {network}: {source}")]
    Plugin {
        /// The network's name.
        network: String,
        /// What the plugin said.
        source: ExecError,
    },
    /// The result cache failed.
    #[error(transparent)]
    Cache(#[from] cache::CacheError),
    /// A blocking task died.
    #[error("{0}")]
    Task(String),
}

impl NetworkError {
    /// Whether it is a plugin's time-out.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            NetworkError::Plugin {
                source: ExecError::Timeout { .. },
                ..
            }
        )
    }
}

/// What CNI needs to know of a pod.
#[derive(Debug, Clone)]
pub struct PodInfo {
    /// The sandbox id (`CNI_CONTAINERID`, `K8S_POD_INFRA_CONTAINER_ID`).
    pub sandbox_id: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_UID`.
    pub uid: String,
    /// Capability args.
    pub runtime_config: RuntimeConf,
}

impl PodInfo {
    /// The CNI view of a pod config: port mappings with a host port, its DNS config, and
    /// the bandwidth annotations (`kubernetes.io/{ingress,egress}-bandwidth`).
    pub fn from_config(sandbox_id: &str, config: &cri::PodSandboxConfig) -> PodInfo {
        let md = config.metadata.clone().unwrap_or_default();
        let port_mappings = config
            .port_mappings
            .iter()
            .filter(|p| p.host_port > 0)
            .map(|p| {
                let protocol = match cri::Protocol::try_from(p.protocol) {
                    Ok(cri::Protocol::Udp) => "udp",
                    Ok(cri::Protocol::Sctp) => "sctp",
                    _ => "tcp",
                };
                let mut m = json!({
                    "hostPort": p.host_port,
                    "containerPort": p.container_port,
                    "protocol": protocol,
                });
                if !p.host_ip.is_empty() {
                    m["hostIP"] = json!(p.host_ip);
                }
                m
            })
            .collect();
        let dns = config
            .dns_config
            .as_ref()
            .map(|d| json!({"servers": d.servers, "searches": d.searches, "options": d.options}));
        let rate = |key: &str| {
            config
                .annotations
                .get(key)
                .and_then(|q| conf::parse_quantity(q))
        };
        let ingress = rate("kubernetes.io/ingress-bandwidth");
        let egress = rate("kubernetes.io/egress-bandwidth");
        let bandwidth = (ingress.is_some() || egress.is_some()).then(|| {
            // Burst as containerd and cri-o set it: effectively unlimited, so that the
            // rate alone shapes the traffic.
            let mut b = serde_json::Map::new();
            if let Some(r) = ingress {
                b.insert("ingressRate".into(), json!(r));
                b.insert("ingressBurst".into(), json!(i32::MAX));
            }
            if let Some(r) = egress {
                b.insert("egressRate".into(), json!(r));
                b.insert("egressBurst".into(), json!(i32::MAX));
            }
            Value::Object(b)
        });
        PodInfo {
            sandbox_id: sandbox_id.to_owned(),
            name: md.name,
            namespace: md.namespace,
            uid: md.uid,
            runtime_config: RuntimeConf {
                port_mappings,
                dns,
                bandwidth,
            },
        }
    }

    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.namespace, self.name, self.sandbox_id, self.uid
        )
    }
}

type Fingerprint = Vec<(PathBuf, u64, i128)>;
/// The config found for a fingerprint of the conf dir.
type Loaded = (Fingerprint, Result<Arc<NetConfList>, ConfError>);

/// The agent's pod networking.
pub struct Network {
    conf_dir: PathBuf,
    bin_dirs: Vec<PathBuf>,
    timeout: Duration,
    netns_dir: PathBuf,
    cache: Cache,
    loaded: Mutex<Option<Loaded>>,
}

impl Network {
    /// Pod networking as the configuration says.
    pub fn new(config: &Config) -> Network {
        Network {
            conf_dir: config.cni.conf_dir.clone(),
            bin_dirs: config.cni.bin_dirs.clone(),
            timeout: Duration::from_secs(config.cni.plugin_timeout_seconds),
            netns_dir: config.state.join("netns"),
            cache: Cache::new(config.root.join("cni").join("results")),
            loaded: Mutex::new(None),
        }
    }

    /// The network config in force: the conf dir is re-read only when a file in it (or
    /// a bin dir) changed, so this is cheap enough for every Status call.
    pub fn current(&self) -> Result<Arc<NetConfList>, ConfError> {
        let fp = conf::fingerprint(&self.conf_dir, &self.bin_dirs);
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((old, res)) = loaded.as_ref() {
            if *old == fp {
                return res.clone();
            }
        }
        let res = conf::load(&self.conf_dir, &self.bin_dirs).map(Arc::new);
        match &res {
            Ok(l) => {
                info!(network = %l.name, file = %l.file.display(), "CNI network config loaded")
            }
            Err(e) => warn!(error = %e, "no usable CNI network config"),
        }
        *loaded = Some((fp, res.clone()));
        res
    }

    /// Whether pods can be networked now, given the recorded pod CIDR: the config in
    /// force, or why there is none.
    pub fn ready(&self, pod_cidr: Option<&str>) -> Result<Arc<NetConfList>, ConfError> {
        let list = self.current()?;
        list.with_pod_cidr(pod_cidr)?;
        Ok(list)
    }

    /// Where a pod's namespace is pinned.
    pub fn netns_path(&self, sandbox_id: &str) -> PathBuf {
        self.netns_dir.join(sandbox_id)
    }

    /// Creates and pins a pod's network namespace.
    pub async fn create_netns(&self, sandbox_id: &str) -> Result<PathBuf, NetworkError> {
        let path = self.netns_path(sandbox_id);
        let p = path.clone();
        tokio::task::spawn_blocking(move || netns::create(&p))
            .await
            .map_err(|e| NetworkError::Task(format!("creating a network namespace: {e}")))??;
        Ok(path)
    }

    /// Unpins and deletes a namespace file. Idempotent.
    pub async fn remove_netns(&self, path: &Path) -> Result<(), NetworkError> {
        let p = path.to_owned();
        tokio::task::spawn_blocking(move || netns::remove(&p))
            .await
            .map_err(|e| NetworkError::Task(format!("removing a network namespace: {e}")))??;
        Ok(())
    }

    fn invocation(&self, a: &Attachment) -> Invocation {
        Invocation {
            container_id: a.container_id.clone(),
            netns: a.netns.clone(),
            ifname: a.if_name.clone(),
            args: a.cni_args.clone(),
            bin_dirs: self.bin_dirs.clone(),
            timeout: self.timeout,
        }
    }

    async fn put(&self, a: &Attachment) -> Result<(), NetworkError> {
        let c = self.cache.clone();
        let a = a.clone();
        tokio::task::spawn_blocking(move || c.put(&a))
            .await
            .map_err(|e| NetworkError::Task(format!("writing the CNI cache: {e}")))??;
        Ok(())
    }

    async fn get(&self, sandbox_id: &str) -> Result<Option<Attachment>, NetworkError> {
        let c = self.cache.clone();
        let id = sandbox_id.to_owned();
        Ok(tokio::task::spawn_blocking(move || c.get(&id, IFNAME))
            .await
            .map_err(|e| NetworkError::Task(format!("reading the CNI cache: {e}")))??)
    }

    /// ADD: attaches the pod's namespace to `list` (pod CIDR already filled in) and
    /// returns the pod's IPs (IPv4 first). The attachment is cached before the first
    /// plugin runs; on failure the caller runs [`Network::del`], as the spec asks.
    pub async fn add(
        &self,
        list: &NetConfList,
        pod: &PodInfo,
        netns: &Path,
    ) -> Result<Vec<String>, NetworkError> {
        let span = tracing::info_span!("cni_add", network = %list.name, pod = %pod.sandbox_id);
        async {
            let mut a = Attachment {
                container_id: pod.sandbox_id.clone(),
                if_name: IFNAME.into(),
                netns: netns.to_owned(),
                cni_args: pod.cni_args(),
                config: list.raw.clone(),
                runtime_config: pod.runtime_config.clone(),
                result: None,
            };
            self.put(&a).await?;
            let inv = self.invocation(&a);
            let mut prev: Option<Value> = None;
            for plugin in &list.plugins {
                let kind = plugin.get("type").and_then(Value::as_str).unwrap_or("");
                let stdin = conf::plugin_config(list, plugin, &a.runtime_config, prev.as_ref());
                let t = std::time::Instant::now();
                let out = exec::run(&inv, kind, Command::Add, &stdin)
                    .await
                    .map_err(|source| NetworkError::Plugin {
                        network: list.name.clone(),
                        source,
                    })?;
                debug!(
                    plugin = kind,
                    ms = t.elapsed().as_millis() as u64,
                    "ADD done"
                );
                if !out.is_null() {
                    prev = Some(out);
                }
            }
            a.result = prev.clone();
            self.put(&a).await?;
            Ok(prev
                .map(|r| exec::pod_ips(&r, IFNAME, netns))
                .unwrap_or_default())
        }
        .instrument(span)
        .await
    }

    /// DEL: detaches the pod with what its ADD ran with (plugins in reverse order, the
    /// ADD result as `prevResult`) and forgets the attachment. Idempotent: nothing
    /// cached is success. Every plugin is tried; the first failure is returned and the
    /// attachment kept for a retry.
    pub async fn del(&self, sandbox_id: &str) -> Result<(), NetworkError> {
        let Some(a) = self.get(sandbox_id).await? else {
            return Ok(());
        };
        let span = tracing::info_span!("cni_del", pod = %sandbox_id);
        async {
            let list = NetConfList::parse(Path::new("<cache>"), &a.config.to_string(), false)
                .map_err(|e| {
                    NetworkError::Task(format!("cached network config is unusable: {e}"))
                })?;
            let inv = self.invocation(&a);
            let mut first_err = None;
            for plugin in list.plugins.iter().rev() {
                let kind = plugin.get("type").and_then(Value::as_str).unwrap_or("");
                let stdin =
                    conf::plugin_config(&list, plugin, &a.runtime_config, a.result.as_ref());
                match exec::run(&inv, kind, Command::Del, &stdin).await {
                    Ok(_) => {}
                    Err(e) if e.is_gone() => debug!(plugin = kind, error = %e, "DEL: already gone"),
                    Err(e) => {
                        warn!(plugin = kind, error = %e, "DEL failed");
                        first_err.get_or_insert(NetworkError::Plugin {
                            network: list.name.clone(),
                            source: e,
                        });
                    }
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            let c = self.cache.clone();
            let id = sandbox_id.to_owned();
            tokio::task::spawn_blocking(move || c.remove(&id, IFNAME))
                .await
                .map_err(|e| NetworkError::Task(format!("removing the CNI cache: {e}")))??;
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Forgets an attachment without DEL: for the undo of a RunPodSandbox whose DEL
    /// failed too (no later call could retry it: the pod does not exist).
    pub async fn forget(&self, sandbox_id: &str) {
        let c = self.cache.clone();
        let id = sandbox_id.to_owned();
        let _ = tokio::task::spawn_blocking(move || c.remove(&id, IFNAME)).await;
    }

    /// CHECK: asks every plugin whether the attachment is still as ADD left it (for
    /// configs of spec 0.4.0 and later that do not disable it).
    pub async fn check(&self, sandbox_id: &str) -> Result<(), NetworkError> {
        let Some(a) = self.get(sandbox_id).await? else {
            return Ok(());
        };
        let list = NetConfList::parse(Path::new("<cache>"), &a.config.to_string(), false)
            .map_err(|e| NetworkError::Task(format!("cached network config is unusable: {e}")))?;
        if version_lt(&list.cni_version, "0.4.0")
            || list.raw.get("disableCheck").and_then(Value::as_bool) == Some(true)
        {
            return Ok(());
        }
        let inv = self.invocation(&a);
        for plugin in &list.plugins {
            let kind = plugin.get("type").and_then(Value::as_str).unwrap_or("");
            let stdin = conf::plugin_config(&list, plugin, &a.runtime_config, a.result.as_ref());
            exec::run(&inv, kind, Command::Check, &stdin)
                .await
                .map_err(|source| NetworkError::Plugin {
                    network: list.name.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// VERSION of every plugin of the config in force: the spec versions each supports.
    pub async fn versions(&self) -> Result<Vec<(String, Vec<String>)>, NetworkError> {
        let list = self.current()?;
        let inv = Invocation {
            container_id: String::new(),
            netns: PathBuf::new(),
            ifname: IFNAME.into(),
            args: String::new(),
            bin_dirs: self.bin_dirs.clone(),
            timeout: self.timeout,
        };
        let mut out = Vec::new();
        for kind in list.types() {
            let v = exec::version(&inv, kind, &list.cni_version)
                .await
                .map_err(|source| NetworkError::Plugin {
                    network: list.name.clone(),
                    source,
                })?;
            out.push((kind.to_owned(), v));
        }
        Ok(out)
    }

    /// DEL, then the namespace: what StopPodSandbox and the undo of RunPodSandbox do.
    /// Idempotent. The namespace is kept while DEL fails, so a retry finds it.
    pub async fn teardown(&self, sandbox_id: &str, netns_path: &str) -> Result<(), NetworkError> {
        self.del(sandbox_id).await?;
        if !netns_path.is_empty() {
            self.remove_netns(Path::new(netns_path)).await?;
        }
        Ok(())
    }
}

fn version_lt(a: &str, b: &str) -> bool {
    let parse = |v: &str| -> Vec<u64> { v.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(a) < parse(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_info_from_config() {
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "p".into(),
                namespace: "ns".into(),
                uid: "u".into(),
                attempt: 0,
            }),
            port_mappings: vec![
                cri::PortMapping {
                    protocol: cri::Protocol::Udp as i32,
                    container_port: 53,
                    host_port: 5353,
                    host_ip: "127.0.0.1".into(),
                },
                cri::PortMapping {
                    protocol: 0,
                    container_port: 80,
                    host_port: 0,
                    host_ip: String::new(),
                },
            ],
            annotations: [(
                "kubernetes.io/ingress-bandwidth".to_string(),
                "1M".to_string(),
            )]
            .into(),
            ..Default::default()
        };
        let p = PodInfo::from_config("id1", &config);
        assert_eq!(
            p.runtime_config.port_mappings,
            vec![
                json!({"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"})
            ]
        );
        assert_eq!(
            p.runtime_config.bandwidth.as_ref().expect("bw")["ingressRate"],
            1_000_000
        );
        assert!(p.runtime_config.dns.is_none());
        assert_eq!(
            p.cni_args(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=id1;K8S_POD_UID=u"
        );
        assert!(version_lt("0.3.1", "0.4.0"));
        assert!(!version_lt("1.0.0", "0.4.0"));
    }
}
