//! ContainerStats, ListContainerStats, PodSandboxStats, ListPodSandboxStats: cgroup
//! figures measured by each pod's shim.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use isola_proto::cri;
use isola_proto::shim as sp;

use super::CriError;
use crate::records::{ContainerRecord, SandboxRecord, SandboxState};
use crate::runtime::Runtime;
use crate::shim::ShimError;

const STATS_TIMEOUT: Duration = Duration::from_secs(10);

fn u64v(v: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value: v })
}

fn cpu(s: &sp::CgroupStats) -> cri::CpuUsage {
    cri::CpuUsage {
        timestamp: s.timestamp_ns,
        usage_core_nano_seconds: u64v(s.cpu_usage_ns),
        usage_nano_cores: None,
    }
}

fn memory(s: &sp::CgroupStats) -> cri::MemoryUsage {
    cri::MemoryUsage {
        timestamp: s.timestamp_ns,
        working_set_bytes: u64v(s.memory_working_set_bytes),
        available_bytes: None,
        usage_bytes: u64v(s.memory_usage_bytes),
        rss_bytes: u64v(s.memory_rss_bytes),
        page_faults: u64v(s.page_faults),
        major_page_faults: u64v(s.major_page_faults),
    }
}

fn container_stats(
    c: &ContainerRecord,
    s: &sp::ContainerStats,
    mountpoint: &str,
) -> cri::ContainerStats {
    let cg = s.cgroup.unwrap_or_default();
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: c.id.clone(),
            metadata: Some(c.metadata()),
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
        }),
        cpu: Some(cpu(&cg)),
        memory: Some(memory(&cg)),
        writable_layer: Some(cri::FilesystemUsage {
            timestamp: cg.timestamp_ns,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: mountpoint.to_owned(),
            }),
            used_bytes: u64v(s.writable_layer_bytes),
            inodes_used: u64v(s.writable_layer_inodes),
        }),
        swap: None,
    }
}

impl Runtime {
    async fn shim_stats(
        &self,
        sb: &SandboxRecord,
        ids: Vec<String>,
    ) -> Result<sp::StatsResponse, CriError> {
        let mut client = self.shim_of(sb)?;
        match tokio::time::timeout(
            STATS_TIMEOUT,
            client.stats(sp::StatsRequest { container_ids: ids }),
        )
        .await
        {
            Ok(Ok(r)) => {
                // The writable layer lives in the agent's snapshot store, not in the shim.
                let mut resp = r.into_inner();
                for c in &mut resp.containers {
                    if let Ok(u) = self.images.snapshot_usage(&c.container_id).await {
                        c.writable_layer_bytes = u.used_bytes;
                        c.writable_layer_inodes = u.inodes_used;
                    }
                }
                Ok(resp)
            }
            Ok(Err(s)) => Err(ShimError::call("Stats", s).into()),
            Err(_) => Err(CriError::DeadlineExceeded(format!(
                "pod sandbox {}: shim Stats did not answer within {}s",
                sb.id,
                STATS_TIMEOUT.as_secs()
            ))),
        }
    }

    fn writable_mountpoint(&self) -> String {
        self.config.images_root().display().to_string()
    }

    /// ContainerStats.
    pub async fn container_stats(
        self: &Arc<Self>,
        req: cri::ContainerStatsRequest,
    ) -> Result<cri::ContainerStatsResponse, CriError> {
        let c = self.find_container(&req.container_id)?;
        let sb = self.find_sandbox(&c.sandbox_id)?;
        let resp = self.shim_stats(&sb, vec![c.id.clone()]).await?;
        let s = resp
            .containers
            .iter()
            .find(|s| s.container_id == c.id)
            .cloned()
            .unwrap_or_default();
        Ok(cri::ContainerStatsResponse {
            stats: Some(container_stats(&c, &s, &self.writable_mountpoint())),
        })
    }

    /// ListContainerStats: running containers matching the filter, grouped per pod.
    pub async fn list_container_stats(
        self: &Arc<Self>,
        req: cri::ListContainerStatsRequest,
    ) -> Result<cri::ListContainerStatsResponse, CriError> {
        let filter = req.filter.map(|f| cri::ContainerFilter {
            id: f.id,
            pod_sandbox_id: f.pod_sandbox_id,
            label_selector: f.label_selector,
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerRunning as i32,
            }),
        });
        let filter = filter.unwrap_or(cri::ContainerFilter {
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerRunning as i32,
            }),
            ..Default::default()
        });
        let containers = super::filter::filter_containers(&self.records, Some(&filter))?;
        let mut by_pod: BTreeMap<String, Vec<ContainerRecord>> = BTreeMap::new();
        for c in containers {
            by_pod.entry(c.sandbox_id.clone()).or_default().push(c);
        }
        let mut stats = Vec::new();
        for (pod, cs) in by_pod {
            let Some(sb) = self.records.sandbox(&pod) else {
                continue;
            };
            if sb.state != SandboxState::Ready {
                continue;
            }
            // One pod's shim failing (its VM just died, say) must not fail the list.
            let resp = match self
                .shim_stats(&sb, cs.iter().map(|c| c.id.clone()).collect())
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(pod = %pod, error = %e, "skipping a pod's container stats");
                    continue;
                }
            };
            for c in &cs {
                if let Some(s) = resp.containers.iter().find(|s| s.container_id == c.id) {
                    stats.push(container_stats(c, s, &self.writable_mountpoint()));
                }
            }
        }
        Ok(cri::ListContainerStatsResponse { stats })
    }

    async fn sandbox_stats(&self, sb: &SandboxRecord) -> Result<cri::PodSandboxStats, CriError> {
        let resp = self.shim_stats(sb, vec![]).await?;
        let cg = resp.sandbox.unwrap_or_default();
        let containers = self.records.containers_of(&sb.id);
        let network = resp.network.first().map(|n| cri::NetworkUsage {
            timestamp: cg.timestamp_ns,
            default_interface: Some(cri::NetworkInterfaceUsage {
                name: n.interface.clone(),
                rx_bytes: u64v(n.rx_bytes),
                rx_errors: u64v(n.rx_errors),
                tx_bytes: u64v(n.tx_bytes),
                tx_errors: u64v(n.tx_errors),
            }),
            interfaces: resp
                .network
                .iter()
                .map(|n| cri::NetworkInterfaceUsage {
                    name: n.interface.clone(),
                    rx_bytes: u64v(n.rx_bytes),
                    rx_errors: u64v(n.rx_errors),
                    tx_bytes: u64v(n.tx_bytes),
                    tx_errors: u64v(n.tx_errors),
                })
                .collect(),
        });
        Ok(cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: sb.id.clone(),
                metadata: Some(sb.metadata()),
                labels: sb.config.labels.clone(),
                annotations: sb.config.annotations.clone(),
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: Some(cpu(&cg)),
                memory: Some(memory(&cg)),
                network,
                process: Some(cri::ProcessUsage {
                    timestamp: cg.timestamp_ns,
                    process_count: u64v(cg.pids),
                }),
                containers: containers
                    .iter()
                    .filter_map(|c| {
                        resp.containers
                            .iter()
                            .find(|s| s.container_id == c.id)
                            .map(|s| container_stats(c, s, &self.writable_mountpoint()))
                    })
                    .collect(),
            }),
            windows: None,
        })
    }

    /// PodSandboxStats.
    pub async fn pod_sandbox_stats(
        self: &Arc<Self>,
        req: cri::PodSandboxStatsRequest,
    ) -> Result<cri::PodSandboxStatsResponse, CriError> {
        let sb = self.find_sandbox(&req.pod_sandbox_id)?;
        Ok(cri::PodSandboxStatsResponse {
            stats: Some(self.sandbox_stats(&sb).await?),
        })
    }

    /// ListPodSandboxStats: ready pods matching the filter.
    pub async fn list_pod_sandbox_stats(
        self: &Arc<Self>,
        req: cri::ListPodSandboxStatsRequest,
    ) -> Result<cri::ListPodSandboxStatsResponse, CriError> {
        let filter = req.filter.map(|f| cri::PodSandboxFilter {
            id: f.id,
            label_selector: f.label_selector,
            state: Some(cri::PodSandboxStateValue {
                state: cri::PodSandboxState::SandboxReady as i32,
            }),
        });
        let filter = filter.unwrap_or(cri::PodSandboxFilter {
            state: Some(cri::PodSandboxStateValue {
                state: cri::PodSandboxState::SandboxReady as i32,
            }),
            ..Default::default()
        });
        let mut stats = Vec::new();
        for sb in super::filter::filter_sandboxes(&self.records, Some(&filter))? {
            match self.sandbox_stats(&sb).await {
                Ok(st) => stats.push(st),
                Err(e) => tracing::warn!(pod = %sb.id, error = %e, "skipping a pod's stats"),
            }
        }
        Ok(cri::ListPodSandboxStatsResponse { stats })
    }
}
