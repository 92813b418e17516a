//! CreateContainer: validate, reserve the container's name in its pod, prepare its root
//! filesystem from its image (a snapshot), have the shim create it, record it. Every
//! step done is undone if a later one fails.

use std::sync::Arc;

use isola_proto::cri;
use isola_proto::shim as sp;
use prost::Message;

use super::CriError;
use crate::ids::new_id;
use crate::records::{container_name, ContainerRecord, ContainerState, SandboxState};
use crate::rollback::Rollback;
use crate::runtime::{now_ns, Runtime};
use crate::shim::ShimError;

const CREATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

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
    if config.log_path.starts_with('/') || config.log_path.split('/').any(|p| p == "..") {
        return Err(CriError::InvalidArgument(format!(
            "config.log_path {:?} must be relative to the pod's log directory, without ..",
            config.log_path
        )));
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
        let found = self.find_sandbox(&req.pod_sandbox_id)?;
        let _guard = self.lock_pod(&found.id).await;
        let sb = self.records.sandbox(&found.id).ok_or(CriError::NotFound {
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
        let mut undo = Rollback::new();
        {
            let rt = Arc::clone(self);
            let (name, id) = (name.clone(), id.clone());
            undo.push("release container name", async move {
                rt.records.release_name(&name, &id)
            });
        }

        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        let result = async {
            let img = self
                .images
                .status(&image_name)?
                .ok_or_else(|| CriError::NotFound {
                    kind: "image",
                    id: format!("{image_name} (pull it first)"),
                })?;
            let mounts = self.images.prepare(&id, &img.id).await?;
            {
                let rt = Arc::clone(self);
                let id = id.clone();
                undo.push("remove snapshot", async move {
                    let _ = rt.images.remove_snapshot(&id).await;
                });
            }
            let log_path = if !sb.config.log_directory.is_empty() && !config.log_path.is_empty() {
                std::path::Path::new(&sb.config.log_directory)
                    .join(&config.log_path)
                    .display()
                    .to_string()
            } else {
                String::new()
            };
            let mut client = self.shim_of(&sb)?;
            let state_dir = self
                .config
                .pod_state_dir(&sb.id)
                .join("containers")
                .join(&id);
            let resp = tokio::time::timeout(
                CREATE_TIMEOUT,
                client.create_container(sp::CreateContainerRequest {
                    container_id: id.clone(),
                    container_config: config.encode_to_vec(),
                    sandbox_config: sb.config.encode_to_vec(),
                    image_config_json: img.config_json.clone(),
                    rootfs: mounts
                        .iter()
                        .map(|m| sp::Mount {
                            r#type: m.kind.clone(),
                            source: m.source.clone(),
                            target: m.target.clone(),
                            options: m.options.clone(),
                        })
                        .collect(),
                    log_path: log_path.clone(),
                    state_dir: state_dir.display().to_string(),
                }),
            )
            .await
            .map_err(|_| {
                CriError::DeadlineExceeded(format!(
                    "the shim did not create the container within {}s",
                    CREATE_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|s| CriError::from(ShimError::call("CreateContainer", s)))?
            .into_inner();
            let image_ref = img
                .repo_digests
                .first()
                .cloned()
                .unwrap_or_else(|| img.id.clone());
            Ok::<_, CriError>(ContainerRecord {
                id: id.clone(),
                sandbox_id: sb.id.clone(),
                config: config.clone(),
                image_ref,
                image_id: img.id.clone(),
                state: ContainerState::Created,
                created_at_ns: now_ns(),
                started_at_ns: 0,
                finished_at_ns: 0,
                exit_code: 0,
                reason: String::new(),
                message: String::new(),
                log_path,
                cgroup_path: resp.cgroup_path,
                pid: resp.pid,
            })
        }
        .await;
        let record = match result {
            Ok(r) => r,
            Err(e) => {
                undo.run().await;
                return Err(e);
            }
        };
        if let Err(e) = self.records.put_container(record).await {
            if let Some(mut client) = self.client(&sb.id) {
                let _ = client
                    .delete_container(sp::DeleteContainerRequest {
                        container_id: id.clone(),
                    })
                    .await;
            }
            undo.run().await;
            return Err(e.into());
        }
        undo.commit();
        self.emit_container_event(&id, cri::ContainerEventType::ContainerCreatedEvent);
        Ok(cri::CreateContainerResponse { container_id: id })
    }

    /// Frees what a container holds outside its shim: its writable layer.
    pub(crate) async fn release_container_resources(
        &self,
        c: &ContainerRecord,
    ) -> Result<(), CriError> {
        // Without a live shim the rootfs may still be mounted: never remove the writable
        // layer from under a mount.
        let dir = self
            .config
            .pod_state_dir(&c.sandbox_id)
            .join("containers")
            .join(&c.id);
        tokio::task::spawn_blocking(move || crate::leftovers::unmount_under(&dir))
            .await
            .map_err(|e| CriError::Internal(format!("unmount task: {e}")))?
            .map_err(|e| CriError::Internal(format!("container {}: {e}", c.id)))?;
        self.images.remove_snapshot(&c.id).await?;
        Ok(())
    }
}
