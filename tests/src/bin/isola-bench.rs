//! The benchmark client: drives a fixed CRI workload against any CRI endpoint (isola,
//! containerd, CRI-O) over its unix socket and prints per-step min/median/p90 as a table
//! and as JSON, so runs of different runtimes compare in the same session.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use isola_proto::cri;
use isola_proto::cri::image_service_client::ImageServiceClient;
use isola_proto::cri::runtime_service_client::RuntimeServiceClient;

/// Runs N iterations of: RunPodSandbox, CreateContainer, StartContainer, ExecSync,
/// StopContainer, RemoveContainer, StopPodSandbox, RemovePodSandbox (after one PullImage).
#[derive(Parser, Debug)]
#[command(name = "isola-bench")]
struct Cli {
    /// CRI endpoint: a unix socket path (unix:// prefix allowed).
    #[arg(long)]
    endpoint: String,
    /// A label for this runtime in the output.
    #[arg(long, default_value = "runtime")]
    name: String,
    /// Iterations.
    #[arg(short, default_value_t = 10)]
    n: usize,
    /// Image to pull and run.
    #[arg(long, default_value = "docker.io/library/busybox:latest")]
    image: String,
    /// Runtime handler (empty: the runtime's default).
    #[arg(long, default_value = "")]
    handler: String,
    /// Pull the image this many times (removing it in between) to time pulls.
    #[arg(long, default_value_t = 1)]
    pulls: usize,
    /// Start a local registry (Debian's docker-registry) on this address, e.g.
    /// 127.0.0.1:5077, push a 60 MB image of 4 layers (busybox + 3 x 20 MiB of random
    /// bytes) to it, and time `--pulls` pulls of it (removing it in between) as the step
    /// "PullImage 60MB local". The runtime must accept plain HTTP from that address
    /// (isolad: `[registry] insecure_registries = ["127.0.0.1:5077"]`; containerd: a
    /// hosts.toml with `server = "http://127.0.0.1:5077"`).
    #[arg(long)]
    local_registry: Option<String>,
    /// Run the pods in the host's network namespace (no CNI), so that runtimes compare
    /// without their network plugins.
    #[arg(long)]
    host_network: bool,
    /// Write the JSON result here as well.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Default, serde::Serialize)]
struct Step {
    ok_ms: Vec<f64>,
    errors: BTreeMap<String, usize>,
    /// The first error's message, to tell why a step failed.
    first_error: Option<String>,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Bench {
    steps: BTreeMap<&'static str, Step>,
    order: Vec<&'static str>,
}

impl Bench {
    fn record(&mut self, name: &'static str, ms: f64) {
        if !self.order.contains(&name) {
            self.order.push(name);
        }
        self.steps.entry(name).or_default().ok_ms.push(ms);
    }

    async fn time<T>(
        &mut self,
        name: &'static str,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Option<T> {
        if !self.order.contains(&name) {
            self.order.push(name);
        }
        let start = Instant::now();
        let r = fut.await;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let step = self.steps.entry(name).or_default();
        match r {
            Ok(v) => {
                step.ok_ms.push(ms);
                Some(v.into_inner())
            }
            Err(s) => {
                *step.errors.entry(format!("{:?}", s.code())).or_default() += 1;
                if step.first_error.is_none() {
                    eprintln!("{name}: {:?}: {}", s.code(), s.message());
                    step.first_error = Some(s.message().to_string());
                }
                None
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let path = PathBuf::from(cli.endpoint.trim_start_matches("unix://"));
    let ch = isola_tests::uds_channel(&path).await?;
    let mut rt = RuntimeServiceClient::new(ch.clone());
    let mut img = ImageServiceClient::new(ch);
    let mut b = Bench {
        steps: BTreeMap::new(),
        order: vec![],
    };
    // Kept alive until the end: dropping it stops the registry.
    let mut _registry = None;
    if let Some(addr) = &cli.local_registry {
        use isola_tests::registry::{big_image, Registry};
        let reg = Registry::start_on(addr)?;
        // The images the pod workload runs: busybox, and a pause image (for runtimes
        // that run a sandbox container) whose entrypoint sleeps.
        let bb = isola_tests::fixtures::busybox_image(
            serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}),
        )?;
        reg.push_image("bench/busybox", "1", &bb)?;
        let pause = isola_tests::fixtures::busybox_image(
            serde_json::json!({"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sleep", "2147483647"]}),
        )?;
        reg.push_image("bench/pause", "1", &pause)?;
        let big = reg.push_image("bench/big", "1", &big_image(3, 20)?)?;
        let big_spec = cri::ImageSpec {
            image: big.reference.clone(),
            ..Default::default()
        };
        for _ in 0..cli.pulls.max(1) {
            let _ = img
                .remove_image(cri::RemoveImageRequest {
                    image: Some(big_spec.clone()),
                })
                .await;
            b.time(
                "PullImage 60MB local",
                img.pull_image(cri::PullImageRequest {
                    image: Some(big_spec.clone()),
                    ..Default::default()
                }),
            )
            .await;
        }
        let _ = img
            .remove_image(cri::RemoveImageRequest {
                image: Some(big_spec),
            })
            .await;
        _registry = Some(reg);
    }
    let image = match (&cli.local_registry, cli.image.as_str()) {
        (Some(addr), "docker.io/library/busybox:latest") => format!("{addr}/bench/busybox:1"),
        _ => cli.image.clone(),
    };
    let spec = cri::ImageSpec {
        image,
        ..Default::default()
    };
    for i in 0..cli.pulls {
        if i > 0 {
            let _ = img
                .remove_image(cri::RemoveImageRequest {
                    image: Some(spec.clone()),
                })
                .await;
        }
        b.time(
            "PullImage",
            img.pull_image(cri::PullImageRequest {
                image: Some(spec.clone()),
                ..Default::default()
            }),
        )
        .await;
    }
    let tag = std::process::id();
    for i in 0..cli.n {
        let pod = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: format!("bench-{i}"),
                namespace: "bench".into(),
                uid: format!("bench-{tag}-{i}"),
                attempt: 0,
            }),
            // kubelet leaves the hostname empty for host-network pods.
            hostname: if cli.host_network {
                String::new()
            } else {
                format!("bench-{i}")
            },
            log_directory: format!("/tmp/isola-bench-{tag}/{i}"),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: if cli.host_network {
                            cri::NamespaceMode::Node as i32
                        } else {
                            cri::NamespaceMode::Pod as i32
                        },
                        pid: cri::NamespaceMode::Container as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let pod_start = Instant::now();
        let Some(r) = b
            .time(
                "RunPodSandbox",
                rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(pod.clone()),
                    runtime_handler: cli.handler.clone(),
                }),
            )
            .await
        else {
            continue;
        };
        let pod_id = r.pod_sandbox_id;
        let ctr = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "c".into(),
                attempt: 0,
            }),
            image: Some(spec.clone()),
            command: vec!["sleep".into(), "3600".into()],
            log_path: "c.log".into(),
            linux: Some(cri::LinuxContainerConfig::default()),
            ..Default::default()
        };
        let created = b
            .time(
                "CreateContainer",
                rt.create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod_id.clone(),
                    config: Some(ctr),
                    sandbox_config: Some(pod),
                }),
            )
            .await;
        if let Some(c) = created {
            let cid = c.container_id;
            b.time(
                "StartContainer",
                rt.start_container(cri::StartContainerRequest {
                    container_id: cid.clone(),
                }),
            )
            .await;
            let total = pod_start.elapsed().as_secs_f64() * 1000.0;
            b.record("Pod+container start", total);
            b.time(
                "ExecSync",
                rt.exec_sync(cri::ExecSyncRequest {
                    container_id: cid.clone(),
                    cmd: vec!["true".into()],
                    timeout: 10,
                }),
            )
            .await;
            b.time(
                "StopContainer",
                rt.stop_container(cri::StopContainerRequest {
                    container_id: cid.clone(),
                    timeout: 0,
                }),
            )
            .await;
            b.time(
                "RemoveContainer",
                rt.remove_container(cri::RemoveContainerRequest { container_id: cid }),
            )
            .await;
        }
        b.time(
            "StopPodSandbox",
            rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod_id.clone(),
            }),
        )
        .await;
        b.time(
            "RemovePodSandbox",
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod_id,
            }),
        )
        .await;
    }
    println!("{} ({} iterations)", cli.name, cli.n);
    println!(
        "{:<18} {:>6} {:>10} {:>10} {:>10}  errors",
        "step", "ok", "min ms", "median ms", "p90 ms"
    );
    let mut json = serde_json::Map::new();
    for name in &b.order {
        let step = b.steps.get_mut(name).expect("step");
        step.ok_ms.sort_by(|a, b| a.total_cmp(b));
        let s = &step.ok_ms;
        let (min, med, p90) = (pct(s, 0.0), pct(s, 0.5), pct(s, 0.9));
        let errors = step
            .errors
            .iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "{:<18} {:>6} {:>10.2} {:>10.2} {:>10.2}  {}",
            name,
            s.len(),
            min,
            med,
            p90,
            errors
        );
        json.insert(
            name.to_string(),
            serde_json::json!({"ok": s.len(), "min_ms": min, "median_ms": med, "p90_ms": p90, "errors": step.errors}),
        );
    }
    let doc = serde_json::json!({"runtime": cli.name, "iterations": cli.n, "steps": json});
    println!("{}", serde_json::to_string(&doc)?);
    if let Some(p) = cli.json {
        std::fs::write(p, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}
