//! `isola-shim-vm`'s service: the shim API (proto/shim.proto) for one VM pod.
//!
//! CreateSandbox boots the pod's microVM through the hypervisor layer, joins it to the
//! pod network ([`net`]) and the virtio-fs share ([`share`]), and switches the agent
//! channel to the shim API served by the native shim's code inside the guest. Every
//! later call is forwarded to the guest after host paths are made guest paths: the
//! container's rootfs, volumes and log directory are bind-mounted into the share. When
//! the VM dies, the pod turns NotReady and its containers Exited (reason `VMExited`) from
//! what the shim last knew of them.

pub mod net;
pub mod settings;
pub mod share;
pub mod vm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use isola_proto::cri;
use isola_proto::guest::ServeShimRequest;
use isola_proto::shim::shim_client::ShimClient;
use isola_proto::shim::shim_server::Shim;
use isola_proto::shim::*;
use isola_proto::SHIM_API_VERSION;
use prost::Message;
use tokio::sync::{broadcast, watch};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument, warn};

use crate::hypervisor::VmConfig;
use crate::select::{select, HostVirt, HypervisorChoice};
use settings::{vm_size, VmSettings};
use share::Share;
use vm::{BootPlan, VmThread};

/// The reason given to containers and the pod when their VM ended underneath them.
pub const REASON_VM_EXITED: &str = "VMExited";
/// The guest shim's log, in the share (readable on the host as `<state>/shared/...`).
const GUEST_LOG: &str = "guest-shim.log";

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

struct Inner {
    sandbox_id: String,
    state_dir: PathBuf,
    vm: VmThread,
    guest: Mutex<Option<ShimClient<Channel>>>,
    share: Mutex<Option<Arc<Share>>>,
    info: Mutex<HashMap<String, String>>,
    vmm_pid: Mutex<u32>,
    ready: Mutex<bool>,
    /// What the shim last knew of each container: answers when the VM is gone.
    containers: Mutex<HashMap<String, ContainerStatus>>,
    events: broadcast::Sender<Event>,
    shutdown: watch::Sender<bool>,
    grace: Mutex<Duration>,
}

/// The shim service of one VM pod.
#[derive(Clone)]
pub struct VmShim {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker thread: {e}")))
}

/// Refuses what a VM cannot honour (the agent checks too; a shim must not trust that).
fn validate_namespaces(config: &cri::PodSandboxConfig) -> Result<(), Status> {
    let ns = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref());
    if let Some(ns) = ns {
        for (what, mode) in [("network", ns.network), ("pid", ns.pid), ("ipc", ns.ipc)] {
            if mode == cri::NamespaceMode::Node as i32 {
                return Err(Status::invalid_argument(format!(
                    "namespace_options.{what} is NODE: a vm pod runs in its own kernel and cannot share the host's {what} namespace"
                )));
            }
        }
    }
    Ok(())
}

impl VmShim {
    /// A shim for `sandbox_id` with its state under `state_dir`; `shutdown` turns true
    /// when the agent asks it to exit.
    pub fn new(
        sandbox_id: String,
        state_dir: PathBuf,
        shutdown: watch::Sender<bool>,
    ) -> std::io::Result<VmShim> {
        let (events, _) = broadcast::channel(1024);
        let shim = VmShim {
            inner: Arc::new(Inner {
                sandbox_id,
                state_dir,
                vm: VmThread::spawn()?,
                guest: Mutex::new(None),
                share: Mutex::new(None),
                info: Mutex::new(HashMap::new()),
                vmm_pid: Mutex::new(0),
                ready: Mutex::new(false),
                containers: Mutex::new(HashMap::new()),
                events,
                shutdown,
                grace: Mutex::new(Duration::from_secs(5)),
            }),
        };
        shim.watch_vm();
        Ok(shim)
    }

    /// When the VM ends, the pod is NotReady and its live containers Exited.
    fn watch_vm(&self) {
        let inner = self.inner.clone();
        let mut exited = inner.vm.watch();
        tokio::spawn(async move {
            let Ok(reason) = exited.wait_for(|r| r.is_some()).await.map(|r| r.clone()) else {
                return;
            };
            let reason = reason.unwrap_or_default();
            *lock(&inner.guest) = None;
            let was_ready = std::mem::replace(&mut *lock(&inner.ready), false);
            let now = now_ns();
            let ended: Vec<ContainerStatus> = lock(&inner.containers)
                .values_mut()
                .filter(|c| {
                    c.state == ContainerState::Created as i32
                        || c.state == ContainerState::Running as i32
                })
                .map(|c| {
                    c.state = ContainerState::Exited as i32;
                    c.exit_code = 255;
                    c.reason = REASON_VM_EXITED.into();
                    c.message = reason.clone();
                    c.finished_at_ns = now;
                    c.clone()
                })
                .collect();
            for c in ended {
                let _ = inner.events.send(Event {
                    r#type: EventType::ContainerExited as i32,
                    container_id: c.container_id.clone(),
                    timestamp_ns: now,
                    status: Some(c),
                });
            }
            if was_ready {
                warn!(%reason, "the pod's VM ended");
                let _ = inner.events.send(Event {
                    r#type: EventType::SandboxStopped as i32,
                    container_id: String::new(),
                    timestamp_ns: now,
                    status: None,
                });
            }
        });
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

    /// The guest's shim client, or why there is none.
    fn guest(&self) -> Result<ShimClient<Channel>, Status> {
        if let Some(reason) = self.inner.vm.exited() {
            return Err(Status::unavailable(format!(
                "the pod's VM has ended: {reason}"
            )));
        }
        lock(&self.inner.guest)
            .clone()
            .ok_or_else(|| Status::failed_precondition("the pod sandbox is not created"))
    }

    /// A failed guest call: when the VM died under it, say so.
    fn guest_error(&self, s: Status) -> Status {
        match self.inner.vm.exited() {
            Some(reason)
                if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown =>
            {
                Status::unavailable(format!("the pod's VM has ended: {reason}"))
            }
            _ => s,
        }
    }

    fn share(&self) -> Result<Arc<Share>, Status> {
        lock(&self.inner.share)
            .clone()
            .ok_or_else(|| Status::failed_precondition("the pod sandbox is not created"))
    }

    fn remember(&self, st: &ContainerStatus) {
        lock(&self.inner.containers).insert(st.container_id.clone(), st.clone());
    }

    fn cached(&self, id: &str) -> Result<ContainerStatus, Status> {
        lock(&self.inner.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("container {id} is not known to this shim")))
    }

    fn status(&self) -> SandboxStatusResponse {
        let ready = *lock(&self.inner.ready);
        SandboxStatusResponse {
            state: if ready {
                SandboxState::Ready
            } else {
                SandboxState::NotReady
            } as i32,
            pid: *lock(&self.inner.vmm_pid),
            reason: self.inner.vm.exited().unwrap_or_default(),
            info: lock(&self.inner.info).clone(),
        }
    }

    /// Follows the guest's events: keeps the status cache current and passes them on.
    fn follow_guest_events(&self, mut client: ShimClient<Channel>) {
        let this = self.clone();
        tokio::spawn(async move {
            let Ok(resp) = client.events(EventsRequest {}).await else {
                return;
            };
            let mut stream = resp.into_inner();
            while let Some(Ok(ev)) = stream.next().await {
                if let Some(st) = &ev.status {
                    if ev.r#type == EventType::ContainerDeleted as i32 {
                        lock(&this.inner.containers).remove(&ev.container_id);
                    } else {
                        this.remember(st);
                    }
                }
                let _ = this.inner.events.send(ev);
            }
        });
    }

    /// Builds the VM for CreateSandbox; on failure nothing is left running or mounted.
    async fn create(&self, req: CreateSandboxRequest) -> Result<CreateSandboxResponse, Status> {
        let settings =
            VmSettings::from_json(&req.class_settings_json).map_err(Status::invalid_argument)?;
        let config = cri::PodSandboxConfig::decode(req.pod_config.as_slice())
            .map_err(|e| Status::invalid_argument(format!("pod_config: {e}")))?;
        validate_namespaces(&config)?;
        let choice: HypervisorChoice = settings
            .hypervisor
            .parse()
            .map_err(|e: crate::select::SelectError| Status::invalid_argument(e.to_string()))?;
        let selection = select(choice, HostVirt::detect())
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        // The guest agent /init hands the shim API to (VmSettings::agent).
        let agent = settings.agent.clone();
        if !agent.as_os_str().is_empty() && !agent.is_file() {
            let e = crate::VmError::MissingAsset {
                what: "agent",
                path: agent,
            };
            return Err(Status::failed_precondition(format!(
                "booting the pod's VM: {e}"
            )));
        }
        let (vcpus, memory_mib) = vm_size(&settings, &config);
        *lock(&self.inner.grace) = Duration::from_secs(settings.shutdown_grace_seconds.max(1));
        let state_dir = if req.state_dir.is_empty() {
            self.inner.state_dir.clone()
        } else {
            PathBuf::from(&req.state_dir)
        };
        let share_dir = state_dir.join("shared");
        let share = blocking({
            let d = share_dir.clone();
            move || Share::create(&d)
        })
        .await?
        .map_err(|e| Status::internal(e.to_string()))?;
        let share = Arc::new(share);
        *lock(&self.inner.share) = Some(share.clone());
        let program = if agent.as_os_str().is_empty() {
            String::new()
        } else {
            let s = share.clone();
            blocking(move || s.bind_agent(&agent))
                .await?
                .map_err(|e| Status::internal(e.to_string()))?
        };

        let netns = req.netns_path.clone();
        let network = if netns.is_empty() {
            None
        } else {
            let r = blocking(move || -> Result<_, net::NetError> {
                let p = Path::new(&netns);
                let Some(iface) = net::read_interface(p)? else {
                    return Ok(None);
                };
                let tap = net::create_tap(p)?;
                net::join_tap(p, iface.mtu)?;
                Ok(Some((iface, tap)))
            })
            .await?;
            r.map_err(|e| Status::internal(format!("pod network: {e}")))?
        };
        let mut vm_config = VmConfig::new(
            &req.sandbox_id,
            &settings.kernel,
            &settings.initramfs,
            &state_dir.join("vm"),
        );
        vm_config.vcpus = vcpus;
        vm_config.memory_mib = memory_mib;
        vm_config.extra_cmdline = settings.kernel_params.clone();
        vm_config.qemu_binary = settings.qemu_binary.clone();
        vm_config.virtiofsd_binary = settings.virtiofsd_binary.clone();
        vm_config.tcg_tb_mib = settings.tcg_tb_mib;
        vm_config.free_page_reporting = settings.free_page_reporting;
        let (interface, tap) = match network {
            Some((iface, tap)) => (Some(iface.guest_request()), Some((tap, iface.mac))),
            None => (None, None),
        };
        let plan = BootPlan {
            config: vm_config,
            selection: selection.clone(),
            tap,
            share_dir: share_dir.clone(),
            interface,
            serve: ServeShimRequest {
                sandbox_id: req.sandbox_id.clone(),
                log_path: format!("{}/{GUEST_LOG}", share::GUEST_SHARE),
                log_filter: std::env::var("ISOLA_GUEST_LOG").unwrap_or_else(|_| "info".into()),
                program,
            },
        };
        let booted = self.inner.vm.boot(plan).await.map_err(|e| match e {
            // The node is not set up for vm pods: say what is missing.
            crate::VmError::MissingAsset { .. }
            | crate::VmError::MissingBinary { .. }
            | crate::VmError::Select(_) => {
                Status::failed_precondition(format!("booting the pod's VM: {e}"))
            }
            other => Status::internal(format!("booting the pod's VM: {other}")),
        })?;
        let mut stream = Some(booted.stream);
        stream
            .as_ref()
            .map(|s| s.set_nonblocking(true))
            .transpose()
            .map_err(|e| Status::internal(format!("agent channel: {e}")))?;
        let channel = Endpoint::from_static("http://isola-guest")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let s = stream.take();
                async move {
                    let s = s.ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::NotConnected,
                            "the guest channel connects once",
                        )
                    })?;
                    Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::from_std(s)?))
                }
            }))
            .await
            .map_err(|e| Status::internal(format!("connecting to the guest shim: {e}")))?;
        let mut client = ShimClient::new(channel);
        let guest_req = CreateSandboxRequest {
            sandbox_id: req.sandbox_id.clone(),
            pod_config: req.pod_config.clone(),
            // The guest's eth0 is the pod network: the pod joins the guest's own netns.
            netns_path: if req.netns_path.is_empty() {
                String::new()
            } else {
                "/proc/1/ns/net".into()
            },
            // Kubelet's cgroup is the host's; inside the guest the shim makes its own.
            cgroup_parent: String::new(),
            runtime_handler: req.runtime_handler.clone(),
            class_settings_json: "{}".into(),
            state_dir: String::new(),
            pod_ips: req.pod_ips.clone(),
        };
        let guest_resp = client.create_sandbox(guest_req).await?.into_inner();
        let vmm_pid = booted.pids.first().copied().unwrap_or(0);
        // The VM's host processes go into kubelet's pod cgroup, where the RuntimeClass
        // overhead is accounted (a systemd slice is systemd's to fill).
        let mut host_pids = booted.pids.clone();
        for p in &booted.pids {
            host_pids.extend(children(*p));
        }
        if !req.cgroup_parent.is_empty() && !req.cgroup_parent.ends_with(".slice") {
            for p in &host_pids {
                for f in isola_container::cgroups::enter(&req.cgroup_parent, *p as i32) {
                    warn!(pid = p, failure = %f, "placing a VM process in the pod cgroup");
                }
            }
        }
        let info: HashMap<String, String> = [
            ("hypervisor".to_string(), selection.backend.to_string()),
            ("hypervisorReason".to_string(), selection.reason.clone()),
            ("vmmPid".to_string(), vmm_pid.to_string()),
            (
                "hostPids".to_string(),
                host_pids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "guestKernel".to_string(),
                booted.hello.kernel_release.clone(),
            ),
            ("vcpus".to_string(), booted.hello.cpus.to_string()),
            (
                "memoryMiB".to_string(),
                (booted.hello.memory_total_bytes >> 20).to_string(),
            ),
            ("guestInfraPid".to_string(), guest_resp.pid.to_string()),
        ]
        .into();
        *lock(&self.inner.info) = info.clone();
        *lock(&self.inner.vmm_pid) = vmm_pid;
        *lock(&self.inner.guest) = Some(client.clone());
        *lock(&self.inner.ready) = true;
        self.follow_guest_events(client);
        info!(vmm_pid, vcpus, memory_mib, kernel = %booted.hello.kernel_release, "vm pod sandbox created");
        Ok(CreateSandboxResponse {
            pid: vmm_pid,
            info,
            cgroup_path: req.cgroup_parent.clone(),
        })
    }

    /// Undoes a failed CreateSandbox: VM, share.
    async fn undo_create(&self) {
        *lock(&self.inner.guest) = None;
        self.inner.vm.stop(Duration::from_millis(500)).await;
        let taken = lock(&self.inner.share).take();
        if let Some(share) = taken {
            let _ = blocking(move || share.destroy()).await;
        }
    }

    /// Turns the host paths of a CreateContainer request into guest paths: the rootfs,
    /// volumes and log directory are bind-mounted into the share.
    fn to_guest(
        &self,
        share: &Share,
        mut req: CreateContainerRequest,
    ) -> Result<CreateContainerRequest, Status> {
        let cid = req.container_id.clone();
        let mut config = cri::ContainerConfig::decode(req.container_config.as_slice())
            .map_err(|e| Status::invalid_argument(format!("container_config: {e}")))?;
        if let Some(d) = config.devices.first() {
            return Err(Status::invalid_argument(format!(
                "devices: {} cannot be passed into a vm pod (the guest has its own devices)",
                d.host_path
            )));
        }
        let invalid_or_internal = |e: share::ShareError| match e {
            share::ShareError::Invalid(m) => Status::invalid_argument(m),
            other => Status::internal(other.to_string()),
        };
        for (i, m) in config.mounts.iter_mut().enumerate() {
            if m.host_path.is_empty() {
                continue;
            }
            let guest = share
                .bind(&cid, &format!("m{i}"), Path::new(&m.host_path), m.readonly)
                .map_err(invalid_or_internal)?;
            m.host_path = guest;
            // Mount events cannot cross into the guest's kernel.
            m.propagation = cri::MountPropagation::PropagationPrivate as i32;
            m.selinux_relabel = false;
        }
        req.container_config = config.encode_to_vec();
        let rootfs = share
            .mount_rootfs(&cid, &req.rootfs)
            .map_err(invalid_or_internal)?;
        req.rootfs = vec![Mount {
            r#type: "bind".into(),
            source: rootfs,
            target: String::new(),
            options: Vec::new(),
        }];
        if !req.log_path.is_empty() {
            let host = Path::new(&req.log_path);
            let (Some(dir), Some(name)) = (host.parent(), host.file_name()) else {
                return Err(Status::invalid_argument(format!(
                    "log_path {:?} names no file",
                    req.log_path
                )));
            };
            std::fs::create_dir_all(dir).map_err(|e| {
                Status::internal(format!("creating log directory {}: {e}", dir.display()))
            })?;
            let guest_dir = share
                .bind(&cid, "log", dir, false)
                .map_err(invalid_or_internal)?;
            req.log_path = format!("{guest_dir}/{}", name.to_string_lossy());
        }
        req.state_dir = String::new();
        Ok(req)
    }
}

#[tonic::async_trait]
impl Shim for VmShim {
    async fn hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloResponse>, Status> {
        let want = request.get_ref().api_version;
        if want != SHIM_API_VERSION {
            return Err(Status::failed_precondition(format!(
                "agent speaks shim API v{want}, this shim v{SHIM_API_VERSION}"
            )));
        }
        if let Ok(mut g) = self.guest() {
            if let Ok(resp) = g.hello(request).await {
                let mut h = resp.into_inner();
                for c in &h.containers {
                    self.remember(c);
                }
                h.shim_kind = "vm".into();
                h.shim_version = env!("CARGO_PKG_VERSION").into();
                h.shim_pid = std::process::id();
                h.sandbox = Some(SandboxStatusResponse {
                    state: h.sandbox.as_ref().map(|s| s.state).unwrap_or(0),
                    ..self.status()
                });
                return Ok(Response::new(h));
            }
        }
        Ok(Response::new(HelloResponse {
            api_version: SHIM_API_VERSION,
            shim_kind: "vm".into(),
            shim_version: env!("CARGO_PKG_VERSION").into(),
            shim_pid: std::process::id(),
            sandbox_id: self.inner.sandbox_id.clone(),
            sandbox: Some(self.status()),
            containers: lock(&self.inner.containers).values().cloned().collect(),
        }))
    }

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id))]
    async fn create_sandbox(
        &self,
        request: Request<CreateSandboxRequest>,
    ) -> Result<Response<CreateSandboxResponse>, Status> {
        let req = request.into_inner();
        self.check_id(&req.sandbox_id)?;
        if lock(&self.inner.share).is_some() {
            return Err(Status::already_exists(format!(
                "pod sandbox {} is already created",
                req.sandbox_id
            )));
        }
        match self.create(req).await {
            Ok(r) => Ok(Response::new(r)),
            Err(e) => {
                warn!(error = %e.message(), "creating the vm pod failed; undoing");
                self.undo_create().await;
                Err(e)
            }
        }
    }

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id))]
    async fn stop_sandbox(
        &self,
        request: Request<StopSandboxRequest>,
    ) -> Result<Response<StopSandboxResponse>, Status> {
        self.check_id(&request.get_ref().sandbox_id)?;
        if let Ok(mut g) = self.guest() {
            g.stop_sandbox(request)
                .await
                .map_err(|s| self.guest_error(s))?;
            // Refresh what is known of each container before the VM goes.
            let ids: Vec<String> = lock(&self.inner.containers).keys().cloned().collect();
            for id in ids {
                if let Ok(r) = g
                    .container_state(ContainerStateRequest { container_id: id })
                    .await
                {
                    if let Some(st) = r.into_inner().status {
                        self.remember(&st);
                    }
                }
            }
        }
        *lock(&self.inner.ready) = false;
        Ok(Response::new(StopSandboxResponse {}))
    }

    async fn sandbox_status(
        &self,
        request: Request<SandboxStatusRequest>,
    ) -> Result<Response<SandboxStatusResponse>, Status> {
        self.check_id(&request.get_ref().sandbox_id)?;
        Ok(Response::new(self.status()))
    }

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id, container = %request.get_ref().container_id))]
    async fn create_container(
        &self,
        request: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        let mut g = self.guest()?;
        if !*lock(&self.inner.ready) {
            return Err(Status::failed_precondition("the pod sandbox is not ready"));
        }
        let share = self.share()?;
        let req = request.into_inner();
        let cid = req.container_id.clone();
        let this = self.clone();
        let sh = share.clone();
        let guest_req = match blocking(move || this.to_guest(&sh, req)).await? {
            Ok(r) => r,
            Err(e) => {
                let _ = blocking(move || share.release(&cid)).await;
                return Err(e);
            }
        };
        match g.create_container(guest_req).await {
            Ok(mut resp) => {
                // The guest's cgroup path means nothing on the host.
                resp.get_mut().cgroup_path = String::new();
                let now = now_ns();
                self.remember(&ContainerStatus {
                    container_id: cid.clone(),
                    state: ContainerState::Created as i32,
                    pid: resp.get_ref().pid,
                    created_at_ns: now,
                    ..Default::default()
                });
                Ok(resp)
            }
            Err(s) => {
                let _ = blocking(move || share.release(&cid)).await;
                Err(self.guest_error(s))
            }
        }
    }

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id, container = %request.get_ref().container_id))]
    async fn start_container(
        &self,
        request: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        let id = request.get_ref().container_id.clone();
        let resp = self
            .guest()?
            .start_container(request)
            .await
            .map_err(|s| self.guest_error(s))?;
        if let Some(c) = lock(&self.inner.containers).get_mut(&id) {
            if c.state == ContainerState::Created as i32 {
                c.state = ContainerState::Running as i32;
                c.pid = resp.get_ref().pid;
                c.started_at_ns = now_ns();
            }
        }
        Ok(resp)
    }

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id, container = %request.get_ref().container_id))]
    async fn kill_container(
        &self,
        request: Request<KillContainerRequest>,
    ) -> Result<Response<KillContainerResponse>, Status> {
        let id = request.get_ref().container_id.clone();
        match self.guest() {
            Ok(mut g) => g
                .kill_container(request)
                .await
                .map_err(|s| self.guest_error(s)),
            // The VM is gone, and every process with it.
            Err(_) if self.cached(&id).is_ok() => Ok(Response::new(KillContainerResponse {})),
            Err(e) => Err(e),
        }
    }

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id, container = %request.get_ref().container_id))]
    async fn wait_container(
        &self,
        request: Request<WaitContainerRequest>,
    ) -> Result<Response<WaitContainerResponse>, Status> {
        let id = request.get_ref().container_id.clone();
        if let Ok(mut g) = self.guest() {
            let mut exited = self.inner.vm.watch();
            tokio::select! {
                r = g.wait_container(request) => match r {
                    Ok(resp) => {
                        if let Some(st) = &resp.get_ref().status {
                            self.remember(st);
                        }
                        return Ok(resp);
                    }
                    Err(s) if self.inner.vm.exited().is_none() => return Err(s),
                    Err(_) => {}
                },
                _ = exited.wait_for(|r| r.is_some()) => {}
            }
            // The VM ended: the watcher marks the containers; give it a moment.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Response::new(WaitContainerResponse {
            status: Some(self.cached(&id)?),
        }))
    }

    async fn container_state(
        &self,
        request: Request<ContainerStateRequest>,
    ) -> Result<Response<ContainerStateResponse>, Status> {
        let id = request.get_ref().container_id.clone();
        if let Ok(mut g) = self.guest() {
            match g.container_state(request).await {
                Ok(resp) => {
                    if let Some(st) = &resp.get_ref().status {
                        self.remember(st);
                    }
                    return Ok(resp);
                }
                Err(s) if self.inner.vm.exited().is_none() => return Err(s),
                Err(_) => {}
            }
        }
        Ok(Response::new(ContainerStateResponse {
            status: Some(self.cached(&id)?),
        }))
    }

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id, container = %request.get_ref().container_id))]
    async fn delete_container(
        &self,
        request: Request<DeleteContainerRequest>,
    ) -> Result<Response<DeleteContainerResponse>, Status> {
        let id = request.get_ref().container_id.clone();
        if let Ok(mut g) = self.guest() {
            match g.delete_container(request).await {
                Ok(_) => {}
                Err(s) if self.inner.vm.exited().is_none() => return Err(s),
                Err(_) => {}
            }
        }
        lock(&self.inner.containers).remove(&id);
        if let Ok(share) = self.share() {
            blocking(move || share.release(&id))
                .await?
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(Response::new(DeleteContainerResponse {}))
    }

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id, container = %request.get_ref().container_id))]
    async fn exec_sync(
        &self,
        request: Request<ExecSyncRequest>,
    ) -> Result<Response<ExecSyncResponse>, Status> {
        self.guest()?
            .exec_sync(request)
            .await
            .map_err(|s| self.guest_error(s))
    }

    type ExecStream = Stream2<StreamOutput>;

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id))]
    async fn exec(
        &self,
        request: Request<Streaming<StreamInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let mut g = self.guest()?;
        let input = forward_input(request.into_inner());
        let out = g.exec(input).await.map_err(|s| self.guest_error(s))?;
        Ok(Response::new(Box::pin(out.into_inner())))
    }

    type AttachStream = Stream2<StreamOutput>;

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id))]
    async fn attach(
        &self,
        request: Request<Streaming<StreamInput>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut g = self.guest()?;
        let input = forward_input(request.into_inner());
        let out = g.attach(input).await.map_err(|s| self.guest_error(s))?;
        Ok(Response::new(Box::pin(out.into_inner())))
    }

    type PortForwardStream = Stream2<PortForwardOutput>;

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id))]
    async fn port_forward(
        &self,
        request: Request<Streaming<PortForwardInput>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        let mut g = self.guest()?;
        let input = forward_input(request.into_inner());
        let out = g
            .port_forward(input)
            .await
            .map_err(|s| self.guest_error(s))?;
        Ok(Response::new(Box::pin(out.into_inner())))
    }

    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        self.guest()?
            .stats(request)
            .await
            .map_err(|s| self.guest_error(s))
    }

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id, container = %request.get_ref().container_id))]
    async fn update_resources(
        &self,
        request: Request<UpdateResourcesRequest>,
    ) -> Result<Response<UpdateResourcesResponse>, Status> {
        self.guest()?
            .update_resources(request)
            .await
            .map_err(|s| self.guest_error(s))
    }

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id, container = %request.get_ref().container_id))]
    async fn reopen_log(
        &self,
        request: Request<ReopenLogRequest>,
    ) -> Result<Response<ReopenLogResponse>, Status> {
        self.guest()?
            .reopen_log(request)
            .await
            .map_err(|s| self.guest_error(s))
    }

    type EventsStream = Stream2<Event>;

    async fn events(
        &self,
        _r: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        Ok(Response::new(
            isola_shim_native::service::events_until_shutdown(
                &self.inner.events,
                &self.inner.shutdown,
            ),
        ))
    }

    #[instrument(skip_all, fields(pod = %self.inner.sandbox_id))]
    async fn shutdown(
        &self,
        request: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        let now = request.get_ref().now;
        info!(now, "shutdown requested");
        let grace = *lock(&self.inner.grace);
        if let Ok(mut g) = self.guest() {
            // The guest shim stops everything, answers, and the guest powers off.
            let asked = tokio::time::timeout(grace, g.shutdown(request)).await;
            if matches!(asked, Ok(Ok(_))) {
                let mut exited = self.inner.vm.watch();
                let _ = tokio::time::timeout(grace, exited.wait_for(|r| r.is_some())).await;
            }
        }
        *lock(&self.inner.guest) = None;
        self.inner.vm.stop(Duration::from_secs(1)).await;
        let taken = lock(&self.inner.share).take();
        if let Some(share) = taken {
            match blocking(move || share.destroy()).await {
                Ok(Err(e)) => warn!(error = %e, "removing the share"),
                Err(e) => warn!(error = %e, "removing the share"),
                Ok(Ok(())) => {}
            }
        }
        self.inner.shutdown.send_replace(true);
        Ok(Response::new(ShutdownResponse {}))
    }
}

/// The direct children of a process (virtiofsd's sandboxed worker).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The agent's half of a stream, passed on to the guest until it ends or fails.
fn forward_input<T: Send + 'static>(input: Streaming<T>) -> impl Stream<Item = T> + Send + 'static {
    input
        .take_while(|r| futures::future::ready(r.is_ok()))
        .filter_map(|r| futures::future::ready(r.ok()))
}
