//! The CRI `runtime.v1` services. One module per call (or per family of calls), each
//! reading top to bottom: validate, reserve, do the work with undo on failure, record.
//! Errors become gRPC statuses in one place (`error`).

pub mod container_create;
pub mod container_lifecycle;
pub mod container_status;
pub mod error;
pub mod events;
pub mod filter;
pub mod image;
pub mod sandbox_remove;
pub mod sandbox_run;
pub mod sandbox_status;
pub mod sandbox_stop;
pub mod stats;
pub mod status;
pub mod streaming;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use isola_proto::cri;
use isola_proto::cri::runtime_service_server::RuntimeService;
use tonic::{Request, Response, Status};
use tracing::{field, Instrument};

pub use error::CriError;

use crate::ids::Resolved;
use crate::records::{ContainerRecord, SandboxRecord};
use crate::runtime::Runtime;

/// The CRI RuntimeService, over the agent's runtime.
#[derive(Clone)]
pub struct RuntimeServer {
    rt: Arc<Runtime>,
}

impl RuntimeServer {
    /// A server over `rt`.
    pub fn new(rt: Arc<Runtime>) -> RuntimeServer {
        RuntimeServer { rt }
    }
}

/// Whether a call changes state (logged at info) or only reads (logged at debug: kubelet
/// polls those every second).
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Mutating,
    Read,
}

/// Runs one CRI call in a span carrying its method and the id it concerns, and logs its
/// outcome with the gRPC code and duration.
pub(crate) async fn traced<T>(
    method: &'static str,
    kind: Kind,
    id: &str,
    fut: impl Future<Output = Result<T, CriError>>,
) -> Result<Response<T>, Status> {
    let span = tracing::info_span!("cri", method, id = field::Empty);
    if !id.is_empty() {
        span.record("id", id);
    }
    let start = Instant::now();
    let result = fut.instrument(span.clone()).await;
    let elapsed_ms = start.elapsed().as_secs_f64() * 1000.0;
    let _enter = span.enter();
    match &result {
        Ok(_) => match kind {
            Kind::Mutating => tracing::info!(code = "OK", elapsed_ms, "done"),
            Kind::Read => tracing::debug!(code = "OK", elapsed_ms, "done"),
        },
        Err(e) => match e.code() {
            tonic::Code::Internal | tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                tracing::error!(code = ?e.code(), error = %e, elapsed_ms, "failed")
            }
            _ => tracing::info!(code = ?e.code(), error = %e, elapsed_ms, "refused"),
        },
    }
    result.map(Response::new).map_err(Status::from)
}

impl Runtime {
    /// A sandbox by id or unique prefix.
    pub(crate) fn find_sandbox(&self, id: &str) -> Result<SandboxRecord, CriError> {
        if id.is_empty() {
            return Err(CriError::InvalidArgument(
                "pod_sandbox_id must not be empty".into(),
            ));
        }
        match self.records.resolve_sandbox(id) {
            Resolved::One(full) => self.records.sandbox(&full).ok_or(CriError::NotFound {
                kind: "pod sandbox",
                id: id.to_owned(),
            }),
            Resolved::None => Err(CriError::NotFound {
                kind: "pod sandbox",
                id: id.to_owned(),
            }),
            Resolved::Ambiguous(matches) => Err(CriError::Ambiguous {
                kind: "pod sandbox",
                prefix: id.to_owned(),
                matches,
            }),
        }
    }

    /// A container by id or unique prefix.
    pub(crate) fn find_container(&self, id: &str) -> Result<ContainerRecord, CriError> {
        if id.is_empty() {
            return Err(CriError::InvalidArgument(
                "container_id must not be empty".into(),
            ));
        }
        match self.records.resolve_container(id) {
            Resolved::One(full) => self.records.container(&full).ok_or(CriError::NotFound {
                kind: "container",
                id: id.to_owned(),
            }),
            Resolved::None => Err(CriError::NotFound {
                kind: "container",
                id: id.to_owned(),
            }),
            Resolved::Ambiguous(matches) => Err(CriError::Ambiguous {
                kind: "container",
                prefix: id.to_owned(),
                matches,
            }),
        }
    }

    /// The live shim client of a pod, or FailedPrecondition naming why there is none.
    pub(crate) fn shim_of(&self, sb: &SandboxRecord) -> Result<crate::shim::Client, CriError> {
        self.client(&sb.id).ok_or_else(|| {
            CriError::FailedPrecondition(format!(
                "pod sandbox {} has no running shim ({})",
                sb.id,
                if sb.reason.is_empty() {
                    "stopped"
                } else {
                    &sb.reason
                }
            ))
        })
    }
}

type EventStream =
    Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl RuntimeService for RuntimeServer {
    async fn version(
        &self,
        request: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        traced("Version", Kind::Read, "", async {
            Ok(status::version(request.into_inner()))
        })
        .await
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        traced(
            "RunPodSandbox",
            Kind::Mutating,
            "",
            self.rt.run_pod_sandbox(request.into_inner()),
        )
        .await
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let r = request.into_inner();
        let id = r.pod_sandbox_id.clone();
        traced(
            "StopPodSandbox",
            Kind::Mutating,
            &id,
            self.rt.stop_pod_sandbox(r),
        )
        .await
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let r = request.into_inner();
        let id = r.pod_sandbox_id.clone();
        traced(
            "RemovePodSandbox",
            Kind::Mutating,
            &id,
            self.rt.remove_pod_sandbox(r),
        )
        .await
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let r = request.into_inner();
        let id = r.pod_sandbox_id.clone();
        traced("PodSandboxStatus", Kind::Read, &id, async {
            self.rt.pod_sandbox_status(r)
        })
        .await
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        traced("ListPodSandbox", Kind::Read, "", async {
            self.rt.list_pod_sandbox(request.into_inner())
        })
        .await
    }

    async fn create_container(
        &self,
        request: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let r = request.into_inner();
        let id = r.pod_sandbox_id.clone();
        traced(
            "CreateContainer",
            Kind::Mutating,
            &id,
            self.rt.create_container(r),
        )
        .await
    }

    async fn start_container(
        &self,
        request: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let r = request.into_inner();
        let id = r.container_id.clone();
        traced(
            "StartContainer",
            Kind::Mutating,
            &id,
            self.rt.start_container(r),
        )
        .await
    }

    async fn stop_container(
        &self,
        request: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let r = request.into_inner();
        let id = r.container_id.clone();
        traced(
            "StopContainer",
            Kind::Mutating,
            &id,
            self.rt.stop_container(r),
        )
        .await
    }

    async fn remove_container(
        &self,
        request: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let r = request.into_inner();
        let id = r.container_id.clone();
        traced(
            "RemoveContainer",
            Kind::Mutating,
            &id,
            self.rt.remove_container(r),
        )
        .await
    }

    async fn list_containers(
        &self,
        request: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        traced("ListContainers", Kind::Read, "", async {
            self.rt.list_containers(request.into_inner())
        })
        .await
    }

    async fn container_status(
        &self,
        request: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let r = request.into_inner();
        let id = r.container_id.clone();
        traced("ContainerStatus", Kind::Read, &id, async {
            self.rt.container_status(r)
        })
        .await
    }

    async fn update_container_resources(
        &self,
        request: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let r = request.into_inner();
        let id = r.container_id.clone();
        traced(
            "UpdateContainerResources",
            Kind::Mutating,
            &id,
            self.rt.update_container_resources(r),
        )
        .await
    }

    async fn reopen_container_log(
        &self,
        request: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let r = request.into_inner();
        let id = r.container_id.clone();
        traced(
            "ReopenContainerLog",
            Kind::Mutating,
            &id,
            self.rt.reopen_container_log(r),
        )
        .await
    }

    async fn exec_sync(
        &self,
        request: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let r = request.into_inner();
        let id = r.container_id.clone();
        traced("ExecSync", Kind::Mutating, &id, self.rt.exec_sync(r)).await
    }

    async fn exec(
        &self,
        request: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let r = request.into_inner();
        let id = r.container_id.clone();
        traced("Exec", Kind::Mutating, &id, async { self.rt.exec(r) }).await
    }

    async fn attach(
        &self,
        request: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let r = request.into_inner();
        let id = r.container_id.clone();
        traced("Attach", Kind::Mutating, &id, async { self.rt.attach(r) }).await
    }

    async fn port_forward(
        &self,
        request: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let r = request.into_inner();
        let id = r.pod_sandbox_id.clone();
        traced("PortForward", Kind::Mutating, &id, async {
            self.rt.port_forward(r)
        })
        .await
    }

    async fn container_stats(
        &self,
        request: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let r = request.into_inner();
        let id = r.container_id.clone();
        traced(
            "ContainerStats",
            Kind::Read,
            &id,
            self.rt.container_stats(r),
        )
        .await
    }

    async fn list_container_stats(
        &self,
        request: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        traced(
            "ListContainerStats",
            Kind::Read,
            "",
            self.rt.list_container_stats(request.into_inner()),
        )
        .await
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let r = request.into_inner();
        let id = r.pod_sandbox_id.clone();
        traced(
            "PodSandboxStats",
            Kind::Read,
            &id,
            self.rt.pod_sandbox_stats(r),
        )
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        traced(
            "ListPodSandboxStats",
            Kind::Read,
            "",
            self.rt.list_pod_sandbox_stats(request.into_inner()),
        )
        .await
    }

    async fn update_runtime_config(
        &self,
        request: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        traced(
            "UpdateRuntimeConfig",
            Kind::Mutating,
            "",
            self.rt.update_runtime_config(request.into_inner()),
        )
        .await
    }

    async fn status(
        &self,
        request: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        traced("Status", Kind::Read, "", async {
            self.rt.status(request.into_inner())
        })
        .await
    }

    async fn checkpoint_container(
        &self,
        request: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        let r = request.into_inner();
        let id = r.container_id.clone();
        traced("CheckpointContainer", Kind::Mutating, &id, async {
            self.rt.find_container(&r.container_id)?;
            Err::<cri::CheckpointContainerResponse, _>(CriError::Unimplemented(
                "CheckpointContainer: container checkpoint/restore (CRIU) is not supported by isola"
                    .into(),
            ))
        })
        .await
    }

    type GetContainerEventsStream = EventStream;

    async fn get_container_events(
        &self,
        request: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        let _ = request;
        traced("GetContainerEvents", Kind::Read, "", async {
            Ok(self.rt.container_events())
        })
        .await
    }

    async fn list_metric_descriptors(
        &self,
        request: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        let _ = request;
        traced("ListMetricDescriptors", Kind::Read, "", async {
            Err::<cri::ListMetricDescriptorsResponse, _>(CriError::Unimplemented(
                "ListMetricDescriptors: CRI-provided metrics (cAdvisor-style descriptors) are not built yet; kubelet keeps using cAdvisor".into(),
            ))
        })
        .await
    }

    async fn list_pod_sandbox_metrics(
        &self,
        request: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        let _ = request;
        traced("ListPodSandboxMetrics", Kind::Read, "", async {
            Err::<cri::ListPodSandboxMetricsResponse, _>(CriError::Unimplemented(
                "ListPodSandboxMetrics: CRI-provided metrics are not built yet; kubelet keeps using cAdvisor".into(),
            ))
        })
        .await
    }

    async fn runtime_config(
        &self,
        request: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        let _ = request;
        traced("RuntimeConfig", Kind::Read, "", async {
            Ok(self.rt.runtime_config())
        })
        .await
    }
}
