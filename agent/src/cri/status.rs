//! Version, Status, RuntimeConfig and UpdateRuntimeConfig.

use isola_proto::cri;
use serde_json::json;

use super::CriError;
use crate::config::CgroupDriver;
use crate::runtime::Runtime;

/// The runtime's name in Version.
pub const RUNTIME_NAME: &str = "isola";
/// The CRI API version served.
pub const RUNTIME_API_VERSION: &str = "v1";
/// The metadata key under which the pod CIDR is recorded.
pub const META_POD_CIDR: &str = "pod_cidr";

/// Version: the kubelet's first call.
pub fn version(_req: cri::VersionRequest) -> cri::VersionResponse {
    cri::VersionResponse {
        // The version of the kubelet runtime API, not of isola (as containerd answers).
        version: "0.1.0".into(),
        runtime_name: RUNTIME_NAME.into(),
        runtime_version: env!("CARGO_PKG_VERSION").into(),
        runtime_api_version: RUNTIME_API_VERSION.into(),
    }
}

impl Runtime {
    /// RuntimeReady: the agent can create pods (its directories are usable and a shim
    /// for the default handler is installed). NetworkReady: pod networking works.
    fn conditions(&self) -> Vec<cri::RuntimeCondition> {
        let mut runtime = cri::RuntimeCondition {
            r#type: "RuntimeReady".into(),
            status: true,
            reason: String::new(),
            message: String::new(),
        };
        let default_class = self.classes.resolve("");
        let problem = match default_class {
            Err(e) => Some(("NoDefaultRuntimeClass", e.to_string())),
            Ok(class) => match self.shims.find_binary(class.shim) {
                Err(e) => Some(("ShimNotInstalled", e.to_string())),
                Ok(_) => match dir_writable(&self.config.state.join("pods")) {
                    Err(e) => Some((
                        "StateDirUnusable",
                        format!("{}: {e}", self.config.state.display()),
                    )),
                    Ok(()) => None,
                },
            },
        };
        if let Some((reason, message)) = problem {
            runtime.status = false;
            runtime.reason = reason.into();
            runtime.message = message;
        }
        let pod_cidr = self.records.meta(META_POD_CIDR).ok().flatten();
        let network = match self.network.ready(pod_cidr.as_deref()) {
            Ok(_) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            Err(e) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: false,
                reason: "NetworkPluginNotReady".into(),
                message: format!("cni plugin not initialized: {e}"),
            },
        };
        vec![runtime, network]
    }

    /// Status.
    pub fn status(&self, req: cri::StatusRequest) -> Result<cri::StatusResponse, CriError> {
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            let classes: Vec<_> = self
                .classes
                .iter()
                .map(|c| {
                    json!({
                        "handler": c.handler,
                        "shim": c.shim.as_str(),
                        "shimBinary": self.shims.find_binary(c.shim).map(|p| p.display().to_string()).unwrap_or_else(|e| e.to_string()),
                        "overhead": c.overhead,
                        "settings": c.settings,
                    })
                })
                .collect();
            let config = serde_json::to_value(&self.config).unwrap_or_default();
            info.insert("config".into(), config.to_string());
            info.insert(
                "runtimeClasses".into(),
                serde_json::Value::Array(classes).to_string(),
            );
            info.insert(
                "defaultRuntimeHandler".into(),
                json!(self.classes.default_handler()).to_string(),
            );
            info.insert(
                "cniConfig".into(),
                match self.network.current() {
                    Ok(l) => json!({"file": l.file, "config": l.raw}),
                    Err(e) => json!({"error": e.to_string()}),
                }
                .to_string(),
            );
            info.insert(
                "podCIDR".into(),
                json!(self
                    .records
                    .meta(META_POD_CIDR)
                    .ok()
                    .flatten()
                    .unwrap_or_default())
                .to_string(),
            );
        }
        let runtime_handlers = self
            .classes
            .iter()
            .map(|c| cri::RuntimeHandler {
                name: c.handler.clone(),
                features: Some(cri::RuntimeHandlerFeatures {
                    recursive_read_only_mounts: false,
                    user_namespaces: false,
                }),
            })
            .collect();
        Ok(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: self.conditions(),
            }),
            info,
            runtime_handlers,
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: false,
            }),
        })
    }

    /// RuntimeConfig: the cgroup driver kubelet must match.
    pub fn runtime_config(&self) -> cri::RuntimeConfigResponse {
        let driver = match self.config.cgroup_driver {
            CgroupDriver::Cgroupfs => cri::CgroupDriver::Cgroupfs,
            CgroupDriver::Systemd => cri::CgroupDriver::Systemd,
        };
        cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: driver as i32,
            }),
        }
    }

    /// UpdateRuntimeConfig: kubelet hands over the node's pod CIDR; it is recorded for the
    /// network configuration.
    pub async fn update_runtime_config(
        &self,
        req: cri::UpdateRuntimeConfigRequest,
    ) -> Result<cri::UpdateRuntimeConfigResponse, CriError> {
        let cidr = req
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        if cidr.is_empty() {
            return Ok(cri::UpdateRuntimeConfigResponse {});
        }
        for part in cidr.split(',') {
            let part = part.trim();
            let valid = part
                .split_once('/')
                .and_then(|(ip, len)| {
                    let ip: std::net::IpAddr = ip.parse().ok()?;
                    let len: u8 = len.parse().ok()?;
                    let max = if ip.is_ipv4() { 32 } else { 128 };
                    (len <= max).then_some(())
                })
                .is_some();
            if !valid {
                return Err(CriError::InvalidArgument(format!(
                    "runtime_config.network_config.pod_cidr: {part:?} is not a CIDR"
                )));
            }
        }
        self.records.set_meta(META_POD_CIDR, &cidr).await?;
        Ok(cri::UpdateRuntimeConfigResponse {})
    }
}

fn dir_writable(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(".probe");
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(probe)
}
