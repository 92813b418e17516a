//! StopPodSandbox: stop every container and the sandbox, let the shim go. Idempotent.

use std::sync::Arc;
use std::time::Duration;

use isola_proto::cri;
use isola_proto::shim as sp;

use super::CriError;
use crate::records::{ContainerState, SandboxRecord, SandboxState};
use crate::runtime::{now_ns, Runtime};
use crate::shim;

const STOP_SANDBOX_TIMEOUT: Duration = Duration::from_secs(60);
const SHIM_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

impl Runtime {
    /// The shim is gone: kill and unmount what it left (its pod's processes, mounts and
    /// cgroups), so that Stop and Remove still clean up.
    pub(crate) async fn clean_after_dead_shim(&self, sb: &SandboxRecord) {
        if sb.shim_kind == crate::classes::ShimKind::Vm {
            let sb2 = sb.clone();
            let dir = self.config.pod_state_dir(&sb.id);
            let _ = tokio::task::spawn_blocking(move || crate::leftovers::clean_vm_pod(&sb2, &dir))
                .await;
            return;
        }
        let sb2 = sb.clone();
        let containers = self.records.containers_of(&sb.id);
        let dir = self.config.pod_state_dir(&sb.id);
        let _ = tokio::task::spawn_blocking(move || {
            crate::leftovers::clean_native_pod(&sb2, &containers, &dir)
        })
        .await;
    }

    /// StopPodSandbox.
    pub async fn stop_pod_sandbox(
        self: &Arc<Self>,
        req: cri::StopPodSandboxRequest,
    ) -> Result<cri::StopPodSandboxResponse, CriError> {
        let found = self.find_sandbox(&req.pod_sandbox_id)?;
        let _guard = self.lock_pod(&found.id).await;
        let Some(mut sb) = self.records.sandbox(&found.id) else {
            // Removed while we waited for the lock: nothing left to stop.
            return Ok(cri::StopPodSandboxResponse {});
        };
        self.stop_sandbox_locked(&mut sb).await?;
        Ok(cri::StopPodSandboxResponse {})
    }

    /// Stops a sandbox whose pod lock the caller holds.
    pub(crate) async fn stop_sandbox_locked(&self, sb: &mut SandboxRecord) -> Result<(), CriError> {
        if sb.state == SandboxState::NotReady && sb.shim.is_none() {
            if sb.reason.starts_with(crate::runtime::REASON_SHIM_EXITED) {
                // Idempotent: kills and unmounts only what is still there.
                self.clean_after_dead_shim(sb).await;
            }
            // A DEL that failed before is retried here (Stop again, or Remove).
            self.network.teardown(&sb.id, &sb.netns_path).await?;
            return Ok(());
        }
        let mut finals: std::collections::HashMap<String, sp::ContainerStatus> = Default::default();
        let shim_was_alive = sb
            .shim
            .as_ref()
            .is_some_and(|rec| shim::record_alive(rec) && self.client(&sb.id).is_some());
        if let Some(rec) = sb.shim.clone() {
            match self.client(&sb.id) {
                Some(mut client) if shim::record_alive(&rec) => {
                    let stopped = tokio::time::timeout(
                        STOP_SANDBOX_TIMEOUT,
                        client.stop_sandbox(sp::StopSandboxRequest {
                            sandbox_id: sb.id.clone(),
                            timeout_seconds: 0,
                        }),
                    )
                    .await;
                    match stopped {
                        Ok(Ok(_)) => {}
                        Ok(Err(status)) if shim::record_alive(&rec) => {
                            return Err(CriError::Internal(format!(
                                "stopping pod sandbox {}: shim StopSandbox: {}",
                                sb.id,
                                status.message()
                            )));
                        }
                        Ok(Err(_)) => {}
                        Err(_) => {
                            return Err(CriError::DeadlineExceeded(format!(
                                "stopping pod sandbox {}: the shim did not stop it within {}s",
                                sb.id,
                                STOP_SANDBOX_TIMEOUT.as_secs()
                            )))
                        }
                    }
                    for c in self.records.containers_of(&sb.id) {
                        if matches!(c.state, ContainerState::Created | ContainerState::Running) {
                            if let Ok(Ok(resp)) = tokio::time::timeout(
                                Duration::from_secs(5),
                                client.container_state(sp::ContainerStateRequest {
                                    container_id: c.id.clone(),
                                }),
                            )
                            .await
                            {
                                if let Some(st) = resp.into_inner().status {
                                    finals.insert(c.id.clone(), st);
                                }
                            }
                        }
                    }
                    let _ = tokio::time::timeout(
                        SHIM_EXIT_TIMEOUT,
                        client.shutdown(sp::ShutdownRequest { now: false }),
                    )
                    .await;
                    if tokio::time::timeout(SHIM_EXIT_TIMEOUT, shim::wait_exit(&rec))
                        .await
                        .is_err()
                    {
                        tracing::warn!(
                            pid = rec.pid,
                            "shim did not exit after Shutdown: killing it"
                        );
                        shim::kill(&rec, nix::sys::signal::Signal::SIGKILL);
                    }
                }
                _ => shim::kill(&rec, nix::sys::signal::Signal::SIGKILL),
            }
            self.release_shim(&sb.id);
            // The shim removes its socket when it exits cleanly; not when it was killed.
            if !shim::record_alive(&rec) {
                let _ = std::fs::remove_file(&rec.socket);
            }
        }
        if !shim_was_alive {
            self.clean_after_dead_shim(sb).await;
        }
        let now = now_ns();
        let mut changed = Vec::new();
        for mut c in self.records.containers_of(&sb.id) {
            if !matches!(c.state, ContainerState::Created | ContainerState::Running) {
                continue;
            }
            match finals.get(&c.id) {
                Some(st) if st.state == sp::ContainerState::Exited as i32 => {
                    c.exit_code = st.exit_code;
                    c.reason = st.reason.clone();
                    c.message = st.message.clone();
                    c.finished_at_ns = if st.finished_at_ns > 0 {
                        st.finished_at_ns
                    } else {
                        now
                    };
                }
                _ => {
                    c.exit_code = 137;
                    c.reason = "Error".into();
                    c.message = "killed when its pod sandbox was stopped".into();
                    c.finished_at_ns = now;
                }
            }
            c.state = ContainerState::Exited;
            changed.push(c);
        }
        let was_ready = sb.state == SandboxState::Ready;
        sb.state = SandboxState::NotReady;
        sb.shim = None;
        if sb.reason.is_empty() {
            sb.reason = "Stopped".into();
        }
        self.records
            .put_many(vec![sb.clone()], changed.clone())
            .await?;
        for c in &changed {
            self.emit_container_event(&c.id, cri::ContainerEventType::ContainerStoppedEvent);
        }
        if was_ready {
            self.emit_sandbox_event(&sb.id, cri::ContainerEventType::ContainerStoppedEvent);
        }
        // After every process of the pod is gone: CNI DEL, then the namespace.
        self.network.teardown(&sb.id, &sb.netns_path).await?;
        Ok(())
    }
}
