//! The shim API served for one native pod.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use isola_container::spec::SpecOptions;
use isola_proto::cri;
use isola_proto::shim::shim_server::Shim;
use isola_proto::shim::*;
use isola_proto::SHIM_API_VERSION;
use prost::Message;
use tokio::sync::{broadcast, watch};
use tonic::{Request, Response, Status};
use tracing::{info, instrument, warn};

use crate::containers::{cgroup_stats, has_cap_sys_resource, Containers};
use crate::sandbox::Sandbox;

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

struct Inner {
    sandbox_id: String,
    state_dir: PathBuf,
    sandbox: Mutex<Option<Sandbox>>,
    ready: Mutex<bool>,
    containers: Mutex<Option<Arc<Containers>>>,
    events: broadcast::Sender<Event>,
    shutdown: watch::Sender<bool>,
}

/// The shim service of one pod.
#[derive(Clone)]
pub struct NativeShim {
    inner: Arc<Inner>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker thread: {e}")))
}

impl NativeShim {
    /// A shim for `sandbox_id` with its state under `state_dir`; `shutdown` turns true
    /// when the agent asks it to exit.
    pub fn new(
        sandbox_id: String,
        state_dir: PathBuf,
        shutdown: watch::Sender<bool>,
    ) -> NativeShim {
        let (events, _) = broadcast::channel(1024);
        NativeShim {
            inner: Arc::new(Inner {
                sandbox_id,
                state_dir,
                sandbox: Mutex::new(None),
                ready: Mutex::new(false),
                containers: Mutex::new(None),
                events,
                shutdown,
            }),
        }
    }

    fn containers(&self) -> Result<Arc<Containers>, Status> {
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Status::failed_precondition("the pod sandbox is not created"))
    }

    fn ready(&self) -> bool {
        *self.inner.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn status(&self) -> SandboxStatusResponse {
        let sb = self.inner.sandbox.lock().unwrap_or_else(|p| p.into_inner());
        SandboxStatusResponse {
            state: if self.ready() {
                SandboxState::Ready
            } else {
                SandboxState::NotReady
            } as i32,
            pid: sb.as_ref().map(|s| s.infra_pid as u32).unwrap_or(0),
            reason: String::new(),
            info: Default::default(),
        }
    }

    fn check_id(&self, id: &str) -> Result<(), Status> {
        if id != self.inner.sandbox_id {
            return Err(Status::invalid_argument(format!(
                "this shim serves pod sandbox {}, not {id}",
                self.inner.sandbox_id
            )));
        }
        Ok(())
    }

    /// Stops everything of the pod (blocking). Idempotent.
    fn stop_all(inner: &Inner) {
        let containers = inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(c) = containers {
            c.kill_all_and_release();
        }
        if let Some(sb) = inner
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            sb.destroy();
        }
        let was = std::mem::replace(
            &mut *inner.ready.lock().unwrap_or_else(|p| p.into_inner()),
            false,
        );
        if was {
            let _ = inner.events.send(Event {
                r#type: EventType::SandboxStopped as i32,
                container_id: String::new(),
                timestamp_ns: now_ns(),
                status: None,
            });
        }
    }
}

/// The `start` message that must open an Exec or Attach stream.
async fn first_start(
    input: &mut tonic::Streaming<StreamInput>,
    call: &str,
) -> Result<StreamStart, Status> {
    match input.message().await? {
        Some(StreamInput {
            kind: Some(stream_input::Kind::Start(s)),
        }) => Ok(s),
        _ => Err(Status::invalid_argument(format!(
            "the first message of {call} must be start"
        ))),
    }
}

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A shim's Events stream: what `events` carries from now on, ending when the shim is
/// told to shut down (an open stream would otherwise hold the graceful shutdown, and
/// StopPodSandbox, until its grace period ran out). Shared with the vm shim.
pub fn events_until_shutdown(
    events: &broadcast::Sender<Event>,
    shutdown: &watch::Sender<bool>,
) -> Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send + 'static>> {
    let mut stop = shutdown.subscribe();
    let stream = tokio_stream::wrappers::BroadcastStream::new(events.subscribe())
        .filter_map(|e| async move { e.ok().map(Ok) })
        .take_until(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
    Box::pin(stream)
}

#[tonic::async_trait]
impl Shim for NativeShim {
    async fn hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloResponse>, Status> {
        let want = request.into_inner().api_version;
        if want != SHIM_API_VERSION {
            return Err(Status::failed_precondition(format!(
                "agent speaks shim API v{want}, this shim v{SHIM_API_VERSION}"
            )));
        }
        let containers = self
            .containers()
            .map(|c| c.all().iter().map(|c| c.status()).collect())
            .unwrap_or_default();
        Ok(Response::new(HelloResponse {
            api_version: SHIM_API_VERSION,
            shim_kind: "native".into(),
            shim_version: env!("CARGO_PKG_VERSION").into(),
            shim_pid: std::process::id(),
            sandbox_id: self.inner.sandbox_id.clone(),
            sandbox: Some(self.status()),
            containers,
        }))
    }

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id))]
    async fn create_sandbox(
        &self,
        request: Request<CreateSandboxRequest>,
    ) -> Result<Response<CreateSandboxResponse>, Status> {
        let req = request.into_inner();
        self.check_id(&req.sandbox_id)?;
        if self
            .inner
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return Err(Status::already_exists(format!(
                "pod sandbox {} is already created",
                req.sandbox_id
            )));
        }
        let config = cri::PodSandboxConfig::decode(req.pod_config.as_slice())
            .map_err(|e| Status::invalid_argument(format!("pod_config: {e}")))?;
        let settings: serde_json::Value =
            serde_json::from_str(if req.class_settings_json.is_empty() {
                "{}"
            } else {
                &req.class_settings_json
            })
            .map_err(|e| Status::invalid_argument(format!("class_settings_json: {e}")))?;
        let restrict = match settings.get("restrict_oom_score_adj") {
            Some(serde_json::Value::Bool(b)) => *b,
            _ => !has_cap_sys_resource(),
        };
        let systemd = req.cgroup_parent.ends_with(".slice");
        let id = req.sandbox_id.clone();
        let state_dir = if req.state_dir.is_empty() {
            self.inner.state_dir.clone()
        } else {
            PathBuf::from(&req.state_dir)
        };
        let netns = req.netns_path.clone();
        let pod_ips = req.pod_ips.clone();
        let sd = state_dir.clone();
        let sb = blocking(move || Sandbox::create(&id, config, &sd, &netns, &pod_ips))
            .await?
            .map_err(|e| match e {
                crate::sandbox::SandboxError::Invalid(m) => Status::invalid_argument(m),
                other => Status::internal(other.to_string()),
            })?;
        let resp = CreateSandboxResponse {
            pid: sb.infra_pid.max(0) as u32,
            info: [
                ("infraPid".to_string(), sb.infra_pid.to_string()),
                (
                    "netns".to_string(),
                    sb.ctx
                        .netns
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "host".into()),
                ),
                ("restrictOomScoreAdj".to_string(), restrict.to_string()),
            ]
            .into(),
            cgroup_path: sb.cgroup_parent.clone(),
        };
        let containers = Containers::new(
            &state_dir.join("runtime"),
            SpecOptions {
                restrict_oom_score_adj: restrict,
                systemd_cgroup: systemd,
            },
            self.inner.events.clone(),
        );
        *self
            .inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(containers));
        *self.inner.sandbox.lock().unwrap_or_else(|p| p.into_inner()) = Some(sb);
        *self.inner.ready.lock().unwrap_or_else(|p| p.into_inner()) = true;
        info!(infra_pid = resp.pid, "sandbox created");
        Ok(Response::new(resp))
    }

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id))]
    async fn stop_sandbox(
        &self,
        request: Request<StopSandboxRequest>,
    ) -> Result<Response<StopSandboxResponse>, Status> {
        self.check_id(&request.into_inner().sandbox_id)?;
        let inner = self.inner.clone();
        blocking(move || NativeShim::stop_all(&inner)).await?;
        info!("sandbox stopped");
        Ok(Response::new(StopSandboxResponse {}))
    }

    async fn sandbox_status(
        &self,
        request: Request<SandboxStatusRequest>,
    ) -> Result<Response<SandboxStatusResponse>, Status> {
        self.check_id(&request.into_inner().sandbox_id)?;
        Ok(Response::new(self.status()))
    }

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id, container = %request.get_ref().container_id))]
    async fn create_container(
        &self,
        request: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        let req = request.into_inner();
        if !self.ready() {
            return Err(Status::failed_precondition("the pod sandbox is not ready"));
        }
        let containers = self.containers()?;
        let ctx = self
            .inner
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.ctx.clone())
            .ok_or_else(|| Status::failed_precondition("the pod sandbox is not created"))?;
        let pod_state = self.inner.state_dir.clone();
        let c = blocking(move || containers.create(&req, &ctx, &pod_state)).await??;
        let st = c.status();
        Ok(Response::new(CreateContainerResponse {
            pid: st.pid,
            cgroup_path: c.cgroups_path.clone(),
        }))
    }

    #[instrument(skip_all, fields(container = %request.get_ref().container_id))]
    async fn start_container(
        &self,
        request: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        let containers = self.containers()?;
        let pid = blocking(move || containers.start(&id)).await??;
        Ok(Response::new(StartContainerResponse { pid }))
    }

    #[instrument(skip_all, fields(container = %request.get_ref().container_id))]
    async fn kill_container(
        &self,
        request: Request<KillContainerRequest>,
    ) -> Result<Response<KillContainerResponse>, Status> {
        let r = request.into_inner();
        let containers = self.containers()?;
        blocking(move || containers.kill(&r.container_id, r.signal, r.all)).await??;
        Ok(Response::new(KillContainerResponse {}))
    }

    async fn wait_container(
        &self,
        request: Request<WaitContainerRequest>,
    ) -> Result<Response<WaitContainerResponse>, Status> {
        let c = self.containers()?.get(&request.into_inner().container_id)?;
        Ok(Response::new(WaitContainerResponse {
            status: Some(c.wait().await),
        }))
    }

    async fn container_state(
        &self,
        request: Request<ContainerStateRequest>,
    ) -> Result<Response<ContainerStateResponse>, Status> {
        let c = self.containers()?.get(&request.into_inner().container_id)?;
        Ok(Response::new(ContainerStateResponse {
            status: Some(c.status()),
        }))
    }

    #[instrument(skip_all, fields(container = %request.get_ref().container_id))]
    async fn delete_container(
        &self,
        request: Request<DeleteContainerRequest>,
    ) -> Result<Response<DeleteContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        let containers = self.containers()?;
        blocking(move || containers.delete(&id)).await??;
        Ok(Response::new(DeleteContainerResponse {}))
    }

    #[instrument(skip_all, fields(container = %request.get_ref().container_id))]
    async fn exec_sync(
        &self,
        request: Request<ExecSyncRequest>,
    ) -> Result<Response<ExecSyncResponse>, Status> {
        let r = request.into_inner();
        let containers = self.containers()?;
        let resp =
            blocking(move || containers.exec_sync(&r.container_id, r.cmd, r.timeout_seconds))
                .await??;
        Ok(Response::new(resp))
    }

    type ExecStream = Stream2<StreamOutput>;

    async fn exec(
        &self,
        r: Request<tonic::Streaming<StreamInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let mut input = r.into_inner();
        let start = first_start(&mut input, "Exec").await?;
        let containers = self.containers()?;
        containers.get(&start.container_id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(crate::streams::exec(containers, start, input, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type AttachStream = Stream2<StreamOutput>;

    async fn attach(
        &self,
        r: Request<tonic::Streaming<StreamInput>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut input = r.into_inner();
        let start = first_start(&mut input, "Attach").await?;
        let containers = self.containers()?;
        containers.get(&start.container_id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(crate::streams::attach(containers, start, input, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type PortForwardStream = Stream2<PortForwardOutput>;

    async fn port_forward(
        &self,
        r: Request<tonic::Streaming<PortForwardInput>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        let infra_pid = self
            .inner
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.infra_pid)
            .filter(|p| *p > 0)
            .ok_or_else(|| Status::failed_precondition("the pod sandbox is not created"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(crate::streams::port_forward(infra_pid, r.into_inner(), tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        let ids = request.into_inner().container_ids;
        let containers = self.containers()?;
        let parent = self
            .inner
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.cgroup_parent.clone())
            .unwrap_or_default();
        let resp = blocking(move || {
            let list = containers
                .all()
                .into_iter()
                .filter(|c| ids.is_empty() || ids.contains(&c.id))
                .map(|c| ContainerStats {
                    container_id: c.id.clone(),
                    cgroup: Some(cgroup_stats(&c.cgroups_path)),
                    writable_layer_bytes: 0,
                    writable_layer_inodes: 0,
                })
                .collect();
            StatsResponse {
                sandbox: Some(cgroup_stats(&isola_container::systemd::fs_path(&parent))),
                containers: list,
                network: vec![],
            }
        })
        .await?;
        Ok(Response::new(resp))
    }

    #[instrument(skip_all, fields(container = %request.get_ref().container_id))]
    async fn update_resources(
        &self,
        request: Request<UpdateResourcesRequest>,
    ) -> Result<Response<UpdateResourcesResponse>, Status> {
        let r = request.into_inner();
        let res = cri::LinuxContainerResources::decode(r.linux_resources.as_slice())
            .map_err(|e| Status::invalid_argument(format!("linux_resources: {e}")))?;
        if r.container_id.is_empty() {
            return Err(Status::unimplemented(
                "updating pod-level resources is done by kubelet on the pod cgroup",
            ));
        }
        let c = self.containers()?.get(&r.container_id)?;
        blocking(move || {
            // Under the systemd driver systemd owns the scope's limits (and re-applies
            // them on daemon-reload): tell it first, then write the cgroup as asked.
            if let Some(slice) = &c.systemd_slice {
                isola_container::systemd::update_scope(slice, &c.id, &res)
                    .map_err(|e| e.to_string())?;
            }
            isola_container::cgroups::update(&c.cgroups_path, &res)
        })
        .await?
        .map_err(|e| Status::internal(format!("updating cgroup: {e}")))?;
        Ok(Response::new(UpdateResourcesResponse {}))
    }

    async fn reopen_log(
        &self,
        request: Request<ReopenLogRequest>,
    ) -> Result<Response<ReopenLogResponse>, Status> {
        let id = request.into_inner().container_id;
        let containers = self.containers()?;
        blocking(move || containers.reopen_log(&id)).await??;
        Ok(Response::new(ReopenLogResponse {}))
    }

    type EventsStream = Stream2<Event>;

    async fn events(
        &self,
        _r: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        Ok(Response::new(events_until_shutdown(
            &self.inner.events,
            &self.inner.shutdown,
        )))
    }

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id))]
    async fn shutdown(
        &self,
        request: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        let now = request.into_inner().now;
        info!(now, "shutdown requested");
        // Nothing of the pod may outlive its shim.
        let inner = self.inner.clone();
        if let Err(e) = blocking(move || NativeShim::stop_all(&inner)).await {
            warn!(error = %e, "stopping before shutdown");
        }
        self.inner.shutdown.send_replace(true);
        Ok(Response::new(ShutdownResponse {}))
    }
}
