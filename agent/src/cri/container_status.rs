//! ContainerStatus and ListContainers.

use isola_proto::cri;
use serde_json::json;

use super::{filter, CriError};
use crate::records::ContainerRecord;
use crate::runtime::Runtime;

/// The CRI status of a container record.
pub fn to_status(c: &ContainerRecord) -> cri::ContainerStatus {
    cri::ContainerStatus {
        id: c.id.clone(),
        metadata: Some(c.metadata()),
        state: c.state.to_cri() as i32,
        created_at: c.created_at_ns,
        started_at: c.started_at_ns,
        finished_at: c.finished_at_ns,
        exit_code: c.exit_code,
        image: c.config.image.clone(),
        image_ref: c.image_ref.clone(),
        reason: c.reason.clone(),
        message: c.message.clone(),
        labels: c.config.labels.clone(),
        annotations: c.config.annotations.clone(),
        mounts: c.config.mounts.clone(),
        log_path: c.log_path.clone(),
        resources: c.config.linux.as_ref().and_then(|l| {
            l.resources.clone().map(|r| cri::ContainerResources {
                linux: Some(r),
                ..Default::default()
            })
        }),
        image_id: c.image_id.clone(),
        ..Default::default()
    }
}

impl Runtime {
    /// ContainerStatus.
    pub fn container_status(
        &self,
        req: cri::ContainerStatusRequest,
    ) -> Result<cri::ContainerStatusResponse, CriError> {
        let c = self.find_container(&req.container_id)?;
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            info.insert(
                "info".into(),
                json!({
                    "id": c.id,
                    "sandboxID": c.sandbox_id,
                    "imageRef": c.image_ref,
                    "config": c.config,
                    "logPath": c.log_path,
                })
                .to_string(),
            );
        }
        Ok(cri::ContainerStatusResponse {
            status: Some(to_status(&c)),
            info,
        })
    }

    /// ListContainers.
    pub fn list_containers(
        &self,
        req: cri::ListContainersRequest,
    ) -> Result<cri::ListContainersResponse, CriError> {
        let containers = filter::filter_containers(&self.records, req.filter.as_ref())?
            .into_iter()
            .map(|c| cri::Container {
                id: c.id.clone(),
                pod_sandbox_id: c.sandbox_id.clone(),
                metadata: Some(c.metadata()),
                image: c.config.image.clone(),
                image_ref: c.image_ref.clone(),
                state: c.state.to_cri() as i32,
                created_at: c.created_at_ns,
                labels: c.config.labels.clone(),
                annotations: c.config.annotations.clone(),
                image_id: c.image_id.clone(),
            })
            .collect();
        Ok(cri::ListContainersResponse { containers })
    }
}
