//! CreateContainer: validate, reserve the container's name in its pod, prepare its root
//! filesystem from its image, have the shim create it, record it.

use std::sync::Arc;

use isola_proto::cri;

use super::CriError;
use crate::ids::new_id;
use crate::records::{container_name, SandboxState};
use crate::runtime::Runtime;

/// Checks what the CRI requires of a CreateContainer request, naming the bad field.
pub fn validate(req: &cri::CreateContainerRequest) -> Result<&cri::ContainerConfig, CriError> {
    if req.pod_sandbox_id.is_empty() {
        return Err(CriError::InvalidArgument(
            "pod_sandbox_id must not be empty".into(),
        ));
    }
    let config = req
        .config
        .as_ref()
        .ok_or_else(|| CriError::InvalidArgument("config is required".into()))?;
    let md = config
        .metadata
        .as_ref()
        .ok_or_else(|| CriError::InvalidArgument("config.metadata is required".into()))?;
    if md.name.is_empty() {
        return Err(CriError::InvalidArgument(
            "config.metadata.name must not be empty".into(),
        ));
    }
    let image = config
        .image
        .as_ref()
        .map(|i| i.image.as_str())
        .unwrap_or("");
    if image.is_empty() {
        return Err(CriError::InvalidArgument(
            "config.image.image must not be empty".into(),
        ));
    }
    Ok(config)
}

impl Runtime {
    /// CreateContainer.
    pub async fn create_container(
        self: &Arc<Self>,
        req: cri::CreateContainerRequest,
    ) -> Result<cri::CreateContainerResponse, CriError> {
        let config = validate(&req)?.clone();
        let sb = self.find_sandbox(&req.pod_sandbox_id)?;
        let _guard = self.lock_pod(&sb.id).await;
        let sb = self.records.sandbox(&sb.id).ok_or(CriError::NotFound {
            kind: "pod sandbox",
            id: req.pod_sandbox_id.clone(),
        })?;
        if sb.state != SandboxState::Ready {
            return Err(CriError::FailedPrecondition(format!(
                "pod sandbox {} is not ready ({}): no container can be created in it",
                sb.id, sb.reason
            )));
        }
        let md = config.metadata.clone().unwrap_or_default();
        let id = new_id();
        tracing::Span::current().record("id", id.as_str());
        let name = container_name(&sb.metadata(), &md);
        self.records.reserve_name(&name, &id).map_err(|holder| {
            CriError::AlreadyExists(format!(
                "container {name} (name_pod_namespace_uid_attempt) already exists with id {holder}"
            ))
        })?;
        let result = self.prepare_rootfs(&config).await;
        self.records.release_name(&name, &id);
        match result {
            Ok(()) => Err(CriError::Internal(
                "unreachable: rootfs without image store".into(),
            )),
            Err(e) => Err(e),
        }
    }

    /// The container's root filesystem from its image.
    async fn prepare_rootfs(&self, config: &cri::ContainerConfig) -> Result<(), CriError> {
        let image = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        Err(CriError::Unimplemented(format!(
            "CreateContainer: image {image:?} cannot be resolved: the image store (pull, unpack, snapshots) is not built yet, so isola cannot create containers"
        )))
    }

    /// Frees what a container holds outside its shim (its writable layer).
    pub(crate) async fn release_container_resources(
        &self,
        _c: &crate::records::ContainerRecord,
    ) -> Result<(), CriError> {
        // Snapshots arrive with the image store; a container holds nothing else here.
        Ok(())
    }
}
