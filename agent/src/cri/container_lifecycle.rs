//! StartContainer, StopContainer, RemoveContainer, UpdateContainerResources,
//! ReopenContainerLog and ExecSync: resolve the container, check its state, forward to
//! its pod's shim, record the outcome.

use std::sync::Arc;
use std::time::Duration;

use isola_proto::cri;
use isola_proto::shim as sp;
use prost::Message;

use super::CriError;
use crate::records::{ContainerRecord, ContainerState};
use crate::runtime::{now_ns, Runtime};
use crate::shim::ShimError;

const SHIM_CALL_TIMEOUT: Duration = Duration::from_secs(60);

async fn call<T>(
    method: &'static str,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CriError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(ShimError::call(method, s).into()),
        Err(_) => Err(CriError::DeadlineExceeded(format!(
            "shim {method} did not answer within {}s",
            timeout.as_secs()
        ))),
    }
}

fn state_name(s: ContainerState) -> &'static str {
    match s {
        ContainerState::Created => "CONTAINER_CREATED",
        ContainerState::Running => "CONTAINER_RUNNING",
        ContainerState::Exited => "CONTAINER_EXITED",
        ContainerState::Unknown => "CONTAINER_UNKNOWN",
    }
}

/// Copies a shim-reported final status into the record.
fn apply_exit(c: &mut ContainerRecord, st: &sp::ContainerStatus) {
    c.state = ContainerState::Exited;
    c.exit_code = st.exit_code;
    c.reason = st.reason.clone();
    c.message = st.message.clone();
    c.finished_at_ns = if st.finished_at_ns > 0 {
        st.finished_at_ns
    } else {
        now_ns()
    };
}

impl Runtime {
    /// The record again under the pod lock (it may have changed while waiting).
    fn reread(&self, id: &str) -> Result<ContainerRecord, CriError> {
        self.records.container(id).ok_or(CriError::NotFound {
            kind: "container",
            id: id.to_owned(),
        })
    }

    /// StartContainer.
    pub async fn start_container(
        self: &Arc<Self>,
        req: cri::StartContainerRequest,
    ) -> Result<cri::StartContainerResponse, CriError> {
        let found = self.find_container(&req.container_id)?;
        let _guard = self.lock_pod(&found.sandbox_id).await;
        let mut c = self.reread(&found.id)?;
        if c.state != ContainerState::Created {
            return Err(CriError::FailedPrecondition(format!(
                "container {} is {}, only a CONTAINER_CREATED container can be started",
                c.id,
                state_name(c.state)
            )));
        }
        let sb = self.find_sandbox(&c.sandbox_id)?;
        let mut client = self.shim_of(&sb)?;
        let started = now_ns();
        call(
            "StartContainer",
            SHIM_CALL_TIMEOUT,
            client.start_container(sp::StartContainerRequest {
                container_id: c.id.clone(),
            }),
        )
        .await?;
        c.state = ContainerState::Running;
        c.started_at_ns = started;
        self.records.put_container(c.clone()).await?;
        self.emit_container_event(&c.id, cri::ContainerEventType::ContainerStartedEvent);
        Ok(cri::StartContainerResponse {})
    }

    /// Stops a running container: its stop signal, then SIGKILL after `timeout` seconds.
    /// The caller holds the pod lock.
    pub(crate) async fn stop_container_locked(
        &self,
        c: &mut ContainerRecord,
        timeout: i64,
    ) -> Result<(), CriError> {
        if c.state != ContainerState::Running {
            return Ok(());
        }
        let sb = self.find_sandbox(&c.sandbox_id)?;
        let mut client = self.shim_of(&sb)?;
        let wait = |mut client: crate::shim::Client, id: String| async move {
            client
                .wait_container(sp::WaitContainerRequest { container_id: id })
                .await
        };
        if timeout > 0 {
            // Signal 0 asks the shim for the container's stop signal (image StopSignal or
            // SIGTERM).
            call(
                "KillContainer",
                SHIM_CALL_TIMEOUT,
                client.kill_container(sp::KillContainerRequest {
                    container_id: c.id.clone(),
                    signal: 0,
                    all: false,
                }),
            )
            .await?;
            if let Ok(Ok(resp)) = tokio::time::timeout(
                Duration::from_secs(timeout as u64),
                wait(client.clone(), c.id.clone()),
            )
            .await
            {
                if let Some(st) = resp.into_inner().status {
                    apply_exit(c, &st);
                    return Ok(());
                }
            }
        }
        call(
            "KillContainer",
            SHIM_CALL_TIMEOUT,
            client.kill_container(sp::KillContainerRequest {
                container_id: c.id.clone(),
                signal: libc::SIGKILL as u32,
                all: true,
            }),
        )
        .await?;
        let resp = call(
            "WaitContainer",
            SHIM_CALL_TIMEOUT,
            wait(client, c.id.clone()),
        )
        .await?;
        match resp.status {
            Some(st) => apply_exit(c, &st),
            None => {
                c.state = ContainerState::Exited;
                c.exit_code = 137;
                c.reason = "Error".into();
                c.finished_at_ns = now_ns();
            }
        }
        Ok(())
    }

    /// StopContainer. Idempotent: stopping a container that is not running succeeds.
    pub async fn stop_container(
        self: &Arc<Self>,
        req: cri::StopContainerRequest,
    ) -> Result<cri::StopContainerResponse, CriError> {
        let found = self.find_container(&req.container_id)?;
        let _guard = self.lock_pod(&found.sandbox_id).await;
        let mut c = self.reread(&found.id)?;
        if c.state != ContainerState::Running {
            return Ok(cri::StopContainerResponse {});
        }
        self.stop_container_locked(&mut c, req.timeout).await?;
        self.records.put_container(c.clone()).await?;
        self.emit_container_event(&c.id, cri::ContainerEventType::ContainerStoppedEvent);
        Ok(cri::StopContainerResponse {})
    }

    /// RemoveContainer. Idempotent: an unknown id is success; a running container is
    /// killed first.
    pub async fn remove_container(
        self: &Arc<Self>,
        req: cri::RemoveContainerRequest,
    ) -> Result<cri::RemoveContainerResponse, CriError> {
        let found = match self.find_container(&req.container_id) {
            Ok(c) => c,
            Err(CriError::NotFound { .. }) => return Ok(cri::RemoveContainerResponse {}),
            Err(e) => return Err(e),
        };
        let _guard = self.lock_pod(&found.sandbox_id).await;
        let Some(mut c) = self.records.container(&found.id) else {
            return Ok(cri::RemoveContainerResponse {});
        };
        if c.state == ContainerState::Running {
            self.stop_container_locked(&mut c, 0).await?;
            self.records.put_container(c.clone()).await?;
        }
        if let Some(mut client) = self.client(&c.sandbox_id) {
            call(
                "DeleteContainer",
                SHIM_CALL_TIMEOUT,
                client.delete_container(sp::DeleteContainerRequest {
                    container_id: c.id.clone(),
                }),
            )
            .await?;
        }
        self.release_container_resources(&c).await?;
        self.emit_container_event(&c.id, cri::ContainerEventType::ContainerDeletedEvent);
        self.records.remove_container(&c.id).await?;
        Ok(cri::RemoveContainerResponse {})
    }

    /// UpdateContainerResources.
    pub async fn update_container_resources(
        self: &Arc<Self>,
        req: cri::UpdateContainerResourcesRequest,
    ) -> Result<cri::UpdateContainerResourcesResponse, CriError> {
        let found = self.find_container(&req.container_id)?;
        let _guard = self.lock_pod(&found.sandbox_id).await;
        let mut c = self.reread(&found.id)?;
        if !matches!(c.state, ContainerState::Created | ContainerState::Running) {
            return Err(CriError::FailedPrecondition(format!(
                "container {} is {}: its resources cannot be updated",
                c.id,
                state_name(c.state)
            )));
        }
        let linux = req.linux.unwrap_or_default();
        let sb = self.find_sandbox(&c.sandbox_id)?;
        let mut client = self.shim_of(&sb)?;
        call(
            "UpdateResources",
            SHIM_CALL_TIMEOUT,
            client.update_resources(sp::UpdateResourcesRequest {
                container_id: c.id.clone(),
                linux_resources: linux.encode_to_vec(),
            }),
        )
        .await?;
        if let Some(l) = c.config.linux.as_mut() {
            l.resources = Some(linux);
        }
        self.records.put_container(c).await?;
        Ok(cri::UpdateContainerResourcesResponse {})
    }

    /// ReopenContainerLog.
    pub async fn reopen_container_log(
        self: &Arc<Self>,
        req: cri::ReopenContainerLogRequest,
    ) -> Result<cri::ReopenContainerLogResponse, CriError> {
        let c = self.find_container(&req.container_id)?;
        if c.state != ContainerState::Running {
            return Err(CriError::FailedPrecondition(format!(
                "container {} is {}: only a running container's log can be reopened",
                c.id,
                state_name(c.state)
            )));
        }
        let sb = self.find_sandbox(&c.sandbox_id)?;
        let mut client = self.shim_of(&sb)?;
        call(
            "ReopenLog",
            SHIM_CALL_TIMEOUT,
            client.reopen_log(sp::ReopenLogRequest {
                container_id: c.id.clone(),
            }),
        )
        .await?;
        Ok(cri::ReopenContainerLogResponse {})
    }

    /// ExecSync.
    pub async fn exec_sync(
        self: &Arc<Self>,
        req: cri::ExecSyncRequest,
    ) -> Result<cri::ExecSyncResponse, CriError> {
        let c = self.find_container(&req.container_id)?;
        if req.cmd.is_empty() {
            return Err(CriError::InvalidArgument("cmd must not be empty".into()));
        }
        if req.timeout < 0 {
            return Err(CriError::InvalidArgument(
                "timeout must not be negative".into(),
            ));
        }
        if c.state != ContainerState::Running {
            return Err(CriError::FailedPrecondition(format!(
                "container {} is {}: exec needs a running container",
                c.id,
                state_name(c.state)
            )));
        }
        let sb = self.find_sandbox(&c.sandbox_id)?;
        let mut client = self.shim_of(&sb)?;
        // The shim enforces the exec timeout (and kills the process); the agent only
        // guards against a shim that stops answering.
        let guard = if req.timeout > 0 {
            Duration::from_secs(req.timeout as u64 + 30)
        } else {
            Duration::from_secs(24 * 3600)
        };
        let resp = call(
            "ExecSync",
            guard,
            client.exec_sync(sp::ExecSyncRequest {
                container_id: c.id.clone(),
                cmd: req.cmd,
                timeout_seconds: req.timeout,
            }),
        )
        .await?;
        if resp.timed_out {
            return Err(CriError::DeadlineExceeded(format!(
                "command timed out after {}s and was killed",
                req.timeout
            )));
        }
        Ok(cri::ExecSyncResponse {
            stdout: resp.stdout,
            stderr: resp.stderr,
            exit_code: resp.exit_code,
        })
    }
}
