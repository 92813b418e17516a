//! RemovePodSandbox: stop it if needed, remove its containers, state and records.
//! Idempotent: an unknown id is success.

use std::sync::Arc;

use isola_proto::cri;

use super::CriError;
use crate::runtime::Runtime;

impl Runtime {
    /// RemovePodSandbox.
    pub async fn remove_pod_sandbox(
        self: &Arc<Self>,
        req: cri::RemovePodSandboxRequest,
    ) -> Result<cri::RemovePodSandboxResponse, CriError> {
        let found = match self.find_sandbox(&req.pod_sandbox_id) {
            Ok(sb) => sb,
            Err(CriError::NotFound { .. }) => return Ok(cri::RemovePodSandboxResponse {}),
            Err(e) => return Err(e),
        };
        let guard = self.lock_pod(&found.id).await;
        let Some(mut sb) = self.records.sandbox(&found.id) else {
            return Ok(cri::RemovePodSandboxResponse {});
        };
        // The CRI says running containers are removed forcibly.
        self.stop_sandbox_locked(&mut sb).await?;
        for c in self.records.containers_of(&sb.id) {
            self.release_container_resources(&c).await?;
        }
        let dir = self.config.pod_state_dir(&sb.id);
        tokio::task::spawn_blocking(move || {
            match crate::leftovers::unmount_under(&dir)
                .map_err(std::io::Error::other)
                .and_then(|_| std::fs::remove_dir_all(&dir))
            {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(CriError::Internal(format!(
                    "removing pod state {}: {e}",
                    dir.display()
                ))),
            }
        })
        .await
        .map_err(|e| CriError::Internal(format!("removing pod state: {e}")))??;
        self.emit_sandbox_event(&sb.id, cri::ContainerEventType::ContainerDeletedEvent);
        self.records.remove_sandbox(&sb.id).await?;
        drop(guard);
        self.forget_pod(&sb.id);
        Ok(cri::RemovePodSandboxResponse {})
    }
}
