//! PodSandboxStatus and ListPodSandbox.

use isola_proto::cri;
use serde_json::json;

use super::{filter, CriError};
use crate::records::SandboxRecord;
use crate::runtime::{now_ns, Runtime};

/// The CRI status of a sandbox record.
pub fn to_status(sb: &SandboxRecord) -> cri::PodSandboxStatus {
    let ns_options = sb
        .config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone());
    cri::PodSandboxStatus {
        id: sb.id.clone(),
        metadata: Some(sb.metadata()),
        state: sb.state.to_cri() as i32,
        created_at: sb.created_at_ns,
        network: Some(cri::PodSandboxNetworkStatus {
            ip: sb.ip.clone(),
            additional_ips: sb
                .additional_ips
                .iter()
                .map(|ip| cri::PodIp { ip: ip.clone() })
                .collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(ns_options.unwrap_or_default()),
            }),
        }),
        labels: sb.config.labels.clone(),
        annotations: sb.config.annotations.clone(),
        runtime_handler: sb.runtime_handler.clone(),
    }
}

impl Runtime {
    /// PodSandboxStatus.
    pub fn pod_sandbox_status(
        &self,
        req: cri::PodSandboxStatusRequest,
    ) -> Result<cri::PodSandboxStatusResponse, CriError> {
        let sb = self.find_sandbox(&req.pod_sandbox_id)?;
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            info.insert(
                "info".into(),
                json!({
                    "id": sb.id,
                    "runtimeHandler": sb.runtime_handler,
                    "shimKind": sb.shim_kind.as_str(),
                    "shim": sb.shim,
                    "reason": sb.reason,
                    "netnsPath": sb.netns_path,
                    "details": sb.info,
                    "config": sb.config,
                })
                .to_string(),
            );
        }
        let containers_statuses = self
            .records
            .containers_of(&sb.id)
            .iter()
            .map(super::container_status::to_status)
            .collect();
        Ok(cri::PodSandboxStatusResponse {
            status: Some(to_status(&sb)),
            info,
            containers_statuses,
            timestamp: now_ns(),
        })
    }

    /// ListPodSandbox.
    pub fn list_pod_sandbox(
        &self,
        req: cri::ListPodSandboxRequest,
    ) -> Result<cri::ListPodSandboxResponse, CriError> {
        let items = filter::filter_sandboxes(&self.records, req.filter.as_ref())?
            .into_iter()
            .map(|sb| cri::PodSandbox {
                id: sb.id.clone(),
                metadata: Some(sb.metadata()),
                state: sb.state.to_cri() as i32,
                created_at: sb.created_at_ns,
                labels: sb.config.labels.clone(),
                annotations: sb.config.annotations.clone(),
                runtime_handler: sb.runtime_handler.clone(),
            })
            .collect();
        Ok(cri::ListPodSandboxResponse { items })
    }
}
