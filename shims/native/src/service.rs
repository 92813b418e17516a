//! The shim API served for one native pod.
//!
//! The sandbox itself (pod namespaces held by an infra process, the pod cgroup) and the
//! containers (libcontainer from an OCI spec) are not built yet: those calls answer
//! Unimplemented naming what is missing. Lifecycle, events and shutdown are real.

use std::pin::Pin;
use std::sync::Mutex;

use futures::Stream;
use isola_proto::shim::shim_server::Shim;
use isola_proto::shim::*;
use isola_proto::SHIM_API_VERSION;
use tokio::sync::{broadcast, watch};
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

const NO_CONTAINERS: &str =
    "native containers (OCI spec, namespaces, cgroups via libcontainer) are not built yet";

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
struct Sandbox {
    id: String,
    state: SandboxState,
}

/// The shim service of one pod.
pub struct NativeShim {
    sandbox_id: String,
    sandbox: Mutex<Option<Sandbox>>,
    events: broadcast::Sender<Event>,
    shutdown: watch::Sender<bool>,
}

impl NativeShim {
    /// A shim for `sandbox_id`; `shutdown` turns true when the agent asks it to exit.
    pub fn new(sandbox_id: String, shutdown: watch::Sender<bool>) -> NativeShim {
        let (events, _) = broadcast::channel(256);
        NativeShim {
            sandbox_id,
            sandbox: Mutex::new(None),
            events,
            shutdown,
        }
    }

    fn sandbox(&self) -> std::sync::MutexGuard<'_, Option<Sandbox>> {
        self.sandbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn status(&self) -> SandboxStatusResponse {
        let sb = self.sandbox().clone();
        SandboxStatusResponse {
            state: sb.map(|s| s.state).unwrap_or(SandboxState::NotReady) as i32,
            pid: 0,
            reason: String::new(),
            info: Default::default(),
        }
    }

    fn check_id(&self, id: &str) -> Result<(), Status> {
        if id != self.sandbox_id {
            return Err(Status::invalid_argument(format!(
                "this shim serves pod sandbox {}, not {id}",
                self.sandbox_id
            )));
        }
        Ok(())
    }
}

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn no_containers<T>(call: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!("{call}: {NO_CONTAINERS}")))
}

#[tonic::async_trait]
impl Shim for NativeShim {
    #[instrument(skip_all, fields(pod = %self.sandbox_id))]
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
        Ok(Response::new(HelloResponse {
            api_version: SHIM_API_VERSION,
            shim_kind: "native".into(),
            shim_version: env!("CARGO_PKG_VERSION").into(),
            shim_pid: std::process::id(),
            sandbox_id: self.sandbox_id.clone(),
            sandbox: Some(self.status()),
            containers: vec![],
        }))
    }

    #[instrument(skip_all, fields(pod = %self.sandbox_id))]
    async fn create_sandbox(
        &self,
        request: Request<CreateSandboxRequest>,
    ) -> Result<Response<CreateSandboxResponse>, Status> {
        let req = request.into_inner();
        self.check_id(&req.sandbox_id)?;
        let mut sb = self.sandbox();
        if sb.is_some() {
            return Err(Status::already_exists(format!(
                "pod sandbox {} is already created",
                req.sandbox_id
            )));
        }
        *sb = Some(Sandbox {
            id: req.sandbox_id,
            state: SandboxState::Ready,
        });
        info!("sandbox created");
        Ok(Response::new(CreateSandboxResponse {
            pid: std::process::id(),
            info: [("shim".to_string(), "native".to_string())].into(),
        }))
    }

    #[instrument(skip_all, fields(pod = %self.sandbox_id))]
    async fn stop_sandbox(
        &self,
        request: Request<StopSandboxRequest>,
    ) -> Result<Response<StopSandboxResponse>, Status> {
        let req = request.into_inner();
        self.check_id(&req.sandbox_id)?;
        let stopped = {
            let mut sb = self.sandbox();
            match sb.as_mut() {
                Some(s) if s.state == SandboxState::Ready => {
                    s.state = SandboxState::NotReady;
                    Some(s.id.clone())
                }
                _ => None,
            }
        };
        if stopped.is_some() {
            info!("sandbox stopped");
            let _ = self.events.send(Event {
                r#type: EventType::SandboxStopped as i32,
                container_id: String::new(),
                timestamp_ns: now_ns(),
                status: None,
            });
        }
        Ok(Response::new(StopSandboxResponse {}))
    }

    async fn sandbox_status(
        &self,
        request: Request<SandboxStatusRequest>,
    ) -> Result<Response<SandboxStatusResponse>, Status> {
        self.check_id(&request.into_inner().sandbox_id)?;
        Ok(Response::new(self.status()))
    }

    async fn create_container(
        &self,
        _r: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        no_containers("CreateContainer")
    }

    async fn start_container(
        &self,
        _r: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        no_containers("StartContainer")
    }

    async fn kill_container(
        &self,
        _r: Request<KillContainerRequest>,
    ) -> Result<Response<KillContainerResponse>, Status> {
        no_containers("KillContainer")
    }

    async fn wait_container(
        &self,
        _r: Request<WaitContainerRequest>,
    ) -> Result<Response<WaitContainerResponse>, Status> {
        no_containers("WaitContainer")
    }

    async fn container_state(
        &self,
        request: Request<ContainerStateRequest>,
    ) -> Result<Response<ContainerStateResponse>, Status> {
        Err(Status::not_found(format!(
            "container {} is not known to this shim",
            request.into_inner().container_id
        )))
    }

    async fn delete_container(
        &self,
        _r: Request<DeleteContainerRequest>,
    ) -> Result<Response<DeleteContainerResponse>, Status> {
        no_containers("DeleteContainer")
    }

    async fn exec_sync(
        &self,
        _r: Request<ExecSyncRequest>,
    ) -> Result<Response<ExecSyncResponse>, Status> {
        no_containers("ExecSync")
    }

    type ExecStream = Stream2<StreamOutput>;

    async fn exec(
        &self,
        _r: Request<tonic::Streaming<StreamInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        no_containers("Exec")
    }

    type AttachStream = Stream2<StreamOutput>;

    async fn attach(
        &self,
        _r: Request<tonic::Streaming<StreamInput>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        no_containers("Attach")
    }

    type PortForwardStream = Stream2<PortForwardOutput>;

    async fn port_forward(
        &self,
        _r: Request<tonic::Streaming<PortForwardInput>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        Err(Status::unimplemented(
            "PortForward: the pod's network namespace is not built yet",
        ))
    }

    async fn stats(&self, _r: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        Err(Status::unimplemented(
            "Stats: the pod cgroup is not built yet, so there is nothing to measure",
        ))
    }

    async fn update_resources(
        &self,
        _r: Request<UpdateResourcesRequest>,
    ) -> Result<Response<UpdateResourcesResponse>, Status> {
        no_containers("UpdateResources")
    }

    async fn reopen_log(
        &self,
        _r: Request<ReopenLogRequest>,
    ) -> Result<Response<ReopenLogResponse>, Status> {
        no_containers("ReopenLog")
    }

    type EventsStream = Stream2<Event>;

    async fn events(
        &self,
        _r: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let rx = self.events.subscribe();
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx)
            .filter_map(|e| async move { e.ok().map(Ok) });
        Ok(Response::new(Box::pin(stream)))
    }

    #[instrument(skip_all, fields(pod = %self.sandbox_id))]
    async fn shutdown(
        &self,
        request: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        let now = request.into_inner().now;
        info!(now, "shutdown requested");
        let _ = self.shutdown.send(true);
        Ok(Response::new(ShutdownResponse {}))
    }
}

use futures::StreamExt;
