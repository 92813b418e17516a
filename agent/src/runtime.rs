//! The agent's core state: configuration, runtime classes, records, the shims of live
//! pods, and the container event feed. The CRI handlers (`cri::*`) work on it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use isola_proto::cri;
use tokio::sync::{broadcast, watch, OwnedMutexGuard};
use tracing::{info, warn, Instrument};

use crate::classes::RuntimeClasses;
use crate::config::Config;
use crate::records::{ContainerState, Records, SandboxRecord, SandboxState, ShimRecord};
use crate::shim::{self, Client, ShimManager};

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Reason recorded when a pod's shim dies without being asked to.
pub const REASON_SHIM_EXITED: &str = "ShimExited";

/// The agent's state shared by every CRI call.
pub struct Runtime {
    /// The configuration in force.
    pub config: Config,
    /// Runtime classes.
    pub classes: RuntimeClasses,
    /// Pod and container records.
    pub records: Records,
    /// Images and containers' root file system snapshots (`<root>/images`).
    pub images: isola_images::ImageStore,
    /// Starts shims.
    pub shims: ShimManager,
    /// Pod networking (CNI).
    pub network: crate::network::Network,
    /// Container (and sandbox) lifecycle events for GetContainerEvents.
    pub events: broadcast::Sender<cri::ContainerEventResponse>,
    /// Turns true when the agent shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Parked exec/attach/port-forward requests and the streaming server's address.
    pub streaming: crate::streaming::Streaming,
    clients: Mutex<HashMap<String, Client>>,
    pod_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Runtime {
    /// A runtime over loaded records.
    pub fn new(
        config: Config,
        classes: RuntimeClasses,
        records: Records,
        images: isola_images::ImageStore,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Runtime> {
        let shims = ShimManager::new(
            &config.shim_dir,
            Duration::from_secs(config.shim_start_timeout_seconds),
            config.log_format,
        );
        let (events, _) = broadcast::channel(1024);
        let streaming = crate::streaming::Streaming::new(&config.streaming);
        let network = crate::network::Network::new(&config);
        Arc::new(Runtime {
            network,
            config,
            classes,
            records,
            images,
            shims,
            events,
            streaming,
            shutdown,
            clients: Mutex::new(HashMap::new()),
            pod_locks: Mutex::new(HashMap::new()),
        })
    }

    /// Serialises the mutating calls on one pod (its containers included).
    pub async fn lock_pod(&self, sandbox_id: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.pod_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks
                .entry(sandbox_id.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
                .clone()
        };
        lock.lock_owned().await
    }

    /// Forgets a removed pod's lock.
    pub fn forget_pod(&self, sandbox_id: &str) {
        self.pod_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(sandbox_id);
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(sandbox_id);
    }

    /// The client of a pod's live shim.
    pub fn client(&self, sandbox_id: &str) -> Option<Client> {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sandbox_id)
            .cloned()
    }

    /// Registers a live shim and starts watching its process.
    pub fn adopt_shim(self: &Arc<Self>, sandbox_id: &str, client: Client, record: ShimRecord) {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sandbox_id.to_owned(), client.clone());
        self.follow_shim_events(sandbox_id, client);
        let rt = Arc::clone(self);
        let id = sandbox_id.to_owned();
        let span = tracing::info_span!("shim_watch", pod = %id, shim_pid = record.pid);
        tokio::spawn(
            async move {
                shim::wait_exit(&record).await;
                rt.on_shim_exit(&id, &record).await;
            }
            .instrument(span),
        );
    }

    /// Follows a shim's events: a container that exits on its own is recorded EXITED with
    /// its code and reason. After subscribing, the state of every container the records
    /// think alive is fetched once, so that exits while nobody listened (an agent
    /// restart) are not missed.
    fn follow_shim_events(self: &Arc<Self>, sandbox_id: &str, mut client: Client) {
        let rt = Arc::clone(self);
        let id = sandbox_id.to_owned();
        let span = tracing::info_span!("shim_events", pod = %id);
        tokio::spawn(
            async move {
                let stream = client.events(isola_proto::shim::EventsRequest {}).await;
                for c in rt.records.containers_of(&id) {
                    if matches!(c.state, ContainerState::Created | ContainerState::Running) {
                        if let Ok(resp) = client
                            .container_state(isola_proto::shim::ContainerStateRequest {
                                container_id: c.id.clone(),
                            })
                            .await
                        {
                            if let Some(st) = resp.into_inner().status {
                                rt.on_container_status(&id, st).await;
                            }
                        }
                    }
                }
                let Ok(stream) = stream else { return };
                let mut stream = stream.into_inner();
                while let Ok(Some(ev)) = stream.message().await {
                    if ev.r#type == isola_proto::shim::EventType::ContainerExited as i32 {
                        if let Some(st) = ev.status {
                            rt.on_container_status(&id, st).await;
                        }
                    } else if ev.r#type == isola_proto::shim::EventType::SandboxStopped as i32 {
                        rt.on_sandbox_stopped(&id, &mut client).await;
                    }
                }
            }
            .instrument(span),
        );
    }

    /// The shim says the sandbox stopped (a VM pod's VM ended): unless the agent stopped
    /// it itself, the pod turns NOTREADY with the shim's reason.
    async fn on_sandbox_stopped(&self, sandbox_id: &str, client: &mut Client) {
        let reason = client
            .sandbox_status(isola_proto::shim::SandboxStatusRequest {
                sandbox_id: sandbox_id.to_owned(),
            })
            .await
            .map(|r| r.into_inner().reason)
            .unwrap_or_default();
        let _guard = self.lock_pod(sandbox_id).await;
        let Some(mut sb) = self.records.sandbox(sandbox_id) else {
            return;
        };
        if sb.state != SandboxState::Ready {
            return;
        }
        warn!(pod = %sandbox_id, %reason, "the pod's sandbox stopped underneath it");
        sb.state = SandboxState::NotReady;
        sb.reason = if reason.is_empty() {
            "SandboxStopped".into()
        } else {
            format!("SandboxStopped: {reason}")
        };
        if let Err(e) = self.records.put_sandbox(sb).await {
            warn!(error = %e, "recording the sandbox's stop");
            return;
        }
        self.emit_sandbox_event(sandbox_id, cri::ContainerEventType::ContainerStoppedEvent);
    }

    /// Records a container's exit reported by its shim.
    async fn on_container_status(&self, sandbox_id: &str, st: isola_proto::shim::ContainerStatus) {
        if st.state != isola_proto::shim::ContainerState::Exited as i32 {
            return;
        }
        let _guard = self.lock_pod(sandbox_id).await;
        let Some(mut c) = self.records.container(&st.container_id) else {
            return;
        };
        if !matches!(c.state, ContainerState::Created | ContainerState::Running) {
            return;
        }
        c.state = ContainerState::Exited;
        c.exit_code = st.exit_code;
        c.reason = st.reason;
        c.message = st.message;
        c.finished_at_ns = if st.finished_at_ns > 0 {
            st.finished_at_ns
        } else {
            now_ns()
        };
        // StartContainer stamps the start when the shim's call returns, which can be
        // after the shim saw a short-lived process exit: the shim's own times win then.
        if st.started_at_ns > 0 && (c.started_at_ns == 0 || c.started_at_ns > c.finished_at_ns) {
            c.started_at_ns = st.started_at_ns;
        }
        c.started_at_ns = c.started_at_ns.min(c.finished_at_ns);
        let cid = c.id.clone();
        if let Err(e) = self.records.put_container(c).await {
            warn!(container = %cid, error = %e, "recording a container's exit");
            return;
        }
        self.emit_container_event(&cid, cri::ContainerEventType::ContainerStoppedEvent);
    }

    /// Drops a shim's client (it was shut down on purpose).
    pub fn release_shim(&self, sandbox_id: &str) {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(sandbox_id);
    }

    /// A shim process ended. If the pod still counts on it, the pod turns NOTREADY and
    /// its containers EXITED (never started) or UNKNOWN (were running), with a reason.
    async fn on_shim_exit(self: &Arc<Self>, sandbox_id: &str, record: &ShimRecord) {
        let _guard = self.lock_pod(sandbox_id).await;
        let Some(mut sb) = self.records.sandbox(sandbox_id) else {
            return;
        };
        if sb.shim.as_ref() != Some(record) {
            // Shut down on purpose (the record no longer names it) or replaced.
            return;
        }
        warn!(pid = record.pid, "shim exited unexpectedly");
        self.release_shim(sandbox_id);
        if let Err(e) = self.mark_shim_dead(&mut sb).await {
            warn!(error = %e, "recording the shim's death");
        }
    }

    /// Records that a pod's shim is gone.
    async fn mark_shim_dead(
        &self,
        sb: &mut SandboxRecord,
    ) -> Result<(), crate::records::RecordError> {
        let pid = sb.shim.as_ref().map(|s| s.pid).unwrap_or(0);
        if let Some(rec) = &sb.shim {
            // A killed shim leaves its socket behind.
            if !shim::record_alive(rec) {
                let _ = std::fs::remove_file(&rec.socket);
            }
        }
        let now = now_ns();
        let was_ready = sb.state == SandboxState::Ready;
        sb.state = SandboxState::NotReady;
        sb.reason = format!("{REASON_SHIM_EXITED}: shim process {pid} exited unexpectedly");
        sb.shim = None;
        let mut changed = Vec::new();
        for mut c in self.records.containers_of(&sb.id) {
            match c.state {
                ContainerState::Created => {
                    c.state = ContainerState::Exited;
                    c.finished_at_ns = now;
                    c.exit_code = 255;
                }
                ContainerState::Running => c.state = ContainerState::Unknown,
                ContainerState::Exited | ContainerState::Unknown => continue,
            }
            c.reason = REASON_SHIM_EXITED.into();
            c.message = format!("the pod's shim (pid {pid}) exited unexpectedly");
            changed.push(c);
        }
        self.records
            .put_many(vec![sb.clone()], changed.clone())
            .await?;
        for c in &changed {
            self.emit_container_event(
                c.id.as_str(),
                cri::ContainerEventType::ContainerStoppedEvent,
            );
        }
        if was_ready {
            self.emit_sandbox_event(&sb.id, cri::ContainerEventType::ContainerStoppedEvent);
        }
        Ok(())
    }

    /// After an agent restart: reconnect to every recorded shim; pods whose shim died
    /// meanwhile turn NOTREADY; shims and state directories with no record (a crash
    /// between starting a shim and recording the pod) are cleaned up.
    pub async fn recover(self: &Arc<Self>) {
        let mut known = std::collections::HashSet::new();
        for mut sb in self.records.sandboxes() {
            known.insert(sb.id.clone());
            let Some(rec) = sb.shim.clone() else { continue };
            match shim::connect(&rec).await {
                Ok(s) => {
                    info!(pod = %sb.id, pid = rec.pid, "reconnected to shim");
                    // A vm pod's VM may have died while the agent was down: the shim
                    // lives on and says so.
                    let stopped =
                        s.hello.sandbox.as_ref().filter(|st| {
                            st.state == isola_proto::shim::SandboxState::NotReady as i32
                        });
                    if let (Some(st), SandboxState::Ready) = (stopped, sb.state) {
                        warn!(pod = %sb.id, reason = %st.reason, "the pod's sandbox stopped while the agent was down");
                        sb.state = SandboxState::NotReady;
                        sb.reason = format!("SandboxStopped: {}", st.reason);
                        if let Err(e) = self.records.put_sandbox(sb.clone()).await {
                            warn!(pod = %sb.id, error = %e, "recording the sandbox's stop");
                        }
                    }
                    self.adopt_shim(&sb.id, s.client, rec);
                }
                Err(e) => {
                    warn!(pod = %sb.id, error = %e, "shim lost while the agent was down");
                    if shim::record_alive(&rec) {
                        // Alive but not answering: it cannot be trusted with the pod.
                        shim::kill(&rec, nix::sys::signal::Signal::SIGKILL);
                    }
                    if let Err(e) = self.mark_shim_dead(&mut sb).await {
                        warn!(pod = %sb.id, error = %e, "recording the shim's death");
                    }
                }
            }
        }
        // Network namespaces and CNI attachments of pods that were never recorded.
        if let Ok(entries) = std::fs::read_dir(self.config.state.join("netns")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if known.contains(&name) {
                    continue;
                }
                warn!(pod = %name, "tearing down the network of a pod that was never recorded");
                let path = entry.path().display().to_string();
                if let Err(e) = self.network.teardown(&name, &path).await {
                    warn!(pod = %name, error = %e, "tearing down an unrecorded pod's network");
                }
            }
        }
        let pods_dir = self.config.state.join("pods");
        let Ok(entries) = std::fs::read_dir(&pods_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if known.contains(&name) {
                continue;
            }
            warn!(pod = %name, "cleaning up the leftovers of a pod that was never recorded");
            cleanup_orphan(&entry.path());
        }
    }
}

/// Kills the shim recorded in an unrecorded pod's state directory and removes it.
fn cleanup_orphan(dir: &Path) {
    if let Ok(text) = std::fs::read_to_string(dir.join("shim.json")) {
        if let Ok(rec) = serde_json::from_str::<ShimRecord>(&text) {
            shim::kill(&rec, nix::sys::signal::Signal::SIGKILL);
            let _ = std::fs::remove_file(&rec.socket);
        }
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        warn!(dir = %dir.display(), error = %e, "removing orphaned pod state");
    }
}

impl Runtime {
    /// Publishes a sandbox lifecycle event (CRI events carry the sandbox id as the
    /// container id for these, as containerd does).
    pub fn emit_sandbox_event(&self, sandbox_id: &str, kind: cri::ContainerEventType) {
        let status = self
            .records
            .sandbox(sandbox_id)
            .map(|sb| crate::cri::sandbox_status::to_status(&sb));
        let containers = self
            .records
            .containers_of(sandbox_id)
            .iter()
            .map(crate::cri::container_status::to_status)
            .collect();
        let _ = self.events.send(cri::ContainerEventResponse {
            container_id: sandbox_id.to_owned(),
            container_event_type: kind as i32,
            created_at: now_ns(),
            pod_sandbox_status: status,
            containers_statuses: containers,
        });
    }

    /// Publishes a container lifecycle event.
    pub fn emit_container_event(&self, container_id: &str, kind: cri::ContainerEventType) {
        let Some(c) = self.records.container(container_id) else {
            return;
        };
        let status = self
            .records
            .sandbox(&c.sandbox_id)
            .map(|sb| crate::cri::sandbox_status::to_status(&sb));
        let _ = self.events.send(cri::ContainerEventResponse {
            container_id: container_id.to_owned(),
            container_event_type: kind as i32,
            created_at: now_ns(),
            pod_sandbox_status: status,
            containers_statuses: vec![crate::cri::container_status::to_status(&c)],
        });
    }
}
