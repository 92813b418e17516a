//! The benchmark client: drives a fixed CRI workload against any CRI endpoint (isola,
//! containerd, CRI-O) over its unix socket and prints per-step min/median/p90 as a table
//! and as JSON, so runs of different runtimes compare in the same session.

use std::collections::{BTreeMap, BTreeSet};
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
    /// With `--local-registry`: push and run only the busybox and pause images, without
    /// the 60 MB image and its pull timings.
    #[arg(long)]
    no_big_pull: bool,
    /// Run the pods in the host's network namespace (no CNI), so that runtimes compare
    /// without their network plugins.
    #[arg(long)]
    host_network: bool,
    /// Write the JSON result here as well.
    #[arg(long)]
    json: Option<PathBuf>,
    /// After the iterations, start this many idle pods (one `sleep 3600` container each)
    /// and measure the host memory of every process of each pod (see [`pod_pids`]).
    #[arg(long, default_value_t = 0)]
    idle_pods: usize,
    /// Seconds to wait after the last idle pod started before measuring (a VM guest
    /// finishes booting its services and QEMU's TCG translations settle).
    #[arg(long, default_value_t = 10)]
    idle_settle: u64,
    /// After the memory measurement, run this shell command (ExecSync, `sh -c`) in the
    /// first idle pod's container and print its output, e.g. `cat /proc/meminfo` to see
    /// a vm pod's guest memory.
    #[arg(long)]
    idle_exec: Option<String>,
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

/// The pod of the workload: host network with `--host-network`, else a network namespace
/// of its own (no CNI network unless the runtime has one configured); pid namespace per
/// container.
fn pod_config(cli: &Cli, tag: u32, name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            namespace: "bench".into(),
            uid: format!("{name}-{tag}"),
            attempt: 0,
        }),
        // kubelet leaves the hostname empty for host-network pods.
        hostname: if cli.host_network {
            String::new()
        } else {
            name.into()
        },
        log_directory: format!("/tmp/isola-bench-{tag}/{name}"),
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
    }
}

/// The workload's container: `sleep 3600`.
fn sleep_container(image: &cri::ImageSpec) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "c".into(),
            attempt: 0,
        }),
        image: Some(image.clone()),
        command: vec!["sleep".into(), "3600".into()],
        log_path: "c.log".into(),
        linux: Some(cri::LinuxContainerConfig::default()),
        ..Default::default()
    }
}

/// Host memory of one process, from /proc/<pid>/smaps_rollup, in KiB.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct ProcMem {
    pid: u32,
    comm: String,
    rss_kib: u64,
    pss_kib: u64,
    pss_anon_kib: u64,
    pss_file_kib: u64,
    pss_shmem_kib: u64,
}

fn proc_mem(pid: u32) -> Option<ProcMem> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let mut m = ProcMem {
        pid,
        comm: comm.trim().to_string(),
        ..Default::default()
    };
    for line in rollup.lines() {
        let mut words = line.split_whitespace();
        let (Some(key), Some(kib)) = (words.next(), words.next()) else {
            continue;
        };
        let kib = kib.parse().unwrap_or(0);
        match key {
            "Rss:" => m.rss_kib = kib,
            "Pss:" => m.pss_kib = kib,
            "Pss_Anon:" => m.pss_anon_kib = kib,
            "Pss_File:" => m.pss_file_kib = kib,
            "Pss_Shmem:" => m.pss_shmem_kib = kib,
            _ => {}
        }
    }
    Some(m)
}

/// pid -> parent pid of every process on the host (/proc/<pid>/stat).
fn parents() -> BTreeMap<u32, u32> {
    let mut map = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return map;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            map.insert(pid, ppid);
        }
    }
    map
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_default()
}

/// The JSON of a verbose status's `info` entry.
fn verbose_info(info: &std::collections::HashMap<String, String>) -> serde_json::Value {
    info.get("info")
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

fn json_pid(v: &serde_json::Value) -> Option<u32> {
    match v {
        serde_json::Value::Number(n) => n.as_u64().map(|n| n as u32),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .filter(|&p| p > 0)
}

/// Every host process of a pod: seeds from the CRI verbose status, then all their
/// descendants.
///
/// - isola: PodSandboxStatus `info.shim.pid` (the pod's shim, recorded by isolad) and
///   `info.details.hostPids` (what the shim started on the host outside its own process
///   tree: for a vm pod the VMM and virtiofsd). A native pod's infra and container
///   processes are the shim's descendants; a vm pod's containers live in the guest (their
///   pids are guest pids and are not used).
/// - containerd (and any runtime without `info.shim`): PodSandboxStatus `info.pid` (the
///   pause process) and ContainerStatus `info.pid` (each container's init), plus their
///   parent when its name starts with `containerd-shim` (containerd-shim-runc-v2 serves
///   all containers of a pod and is the subreaper of their processes).
async fn pod_pids(
    rt: &mut RuntimeServiceClient<tonic::transport::Channel>,
    pod_id: &str,
    container_ids: &[String],
) -> anyhow::Result<BTreeSet<u32>> {
    let st = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.into(),
            verbose: true,
        })
        .await?
        .into_inner();
    let info = verbose_info(&st.info);
    let mut seeds = BTreeSet::new();
    if let Some(shim) = json_pid(&info["shim"]["pid"]) {
        seeds.insert(shim);
        if let Some(host) = info["details"]["hostPids"].as_str() {
            seeds.extend(host.split(',').filter_map(|p| p.trim().parse::<u32>().ok()));
        }
    } else {
        let mut pids: Vec<u32> = json_pid(&info["pid"]).into_iter().collect();
        for id in container_ids {
            let cs = rt
                .container_status(cri::ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: true,
                })
                .await?
                .into_inner();
            pids.extend(json_pid(&verbose_info(&cs.info)["pid"]));
        }
        let parent = parents();
        for pid in pids {
            seeds.insert(pid);
            if let Some(&pp) = parent.get(&pid) {
                if comm(pp).starts_with("containerd-shim") {
                    seeds.insert(pp);
                }
            }
        }
    }
    seeds.retain(|&p| p > 1);
    if seeds.is_empty() {
        anyhow::bail!("no host pid in the verbose status of pod {pod_id}: {info}");
    }
    let parent = parents();
    let mut all = seeds.clone();
    loop {
        let more: Vec<u32> = parent
            .iter()
            .filter(|(pid, pp)| all.contains(pp) && !all.contains(pid))
            .map(|(pid, _)| *pid)
            .collect();
        if more.is_empty() {
            break;
        }
        all.extend(more);
    }
    Ok(all)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    pct(&v, 0.5)
}

/// The memory step: `k` idle pods up at once, then every process of each measured.
async fn idle_memory(
    cli: &Cli,
    rt: &mut RuntimeServiceClient<tonic::transport::Channel>,
    image: &cri::ImageSpec,
    tag: u32,
) -> anyhow::Result<serde_json::Value> {
    let mut pods: Vec<(String, Vec<String>)> = Vec::new();
    let mut result = Err(anyhow::anyhow!("no pod"));
    let mut all_up = true;
    for i in 0..cli.idle_pods {
        let pod = pod_config(cli, tag, &format!("idle-{i}"));
        let started = async {
            let id = rt
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(pod.clone()),
                    runtime_handler: cli.handler.clone(),
                })
                .await?
                .into_inner()
                .pod_sandbox_id;
            pods.push((id.clone(), vec![]));
            let cid = rt
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: id,
                    config: Some(sleep_container(image)),
                    sandbox_config: Some(pod),
                })
                .await?
                .into_inner()
                .container_id;
            pods.last_mut().expect("pod").1.push(cid.clone());
            rt.start_container(cri::StartContainerRequest { container_id: cid })
                .await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = started {
            result = Err(e.context(format!("starting idle pod {i}")));
            all_up = false;
            break;
        }
    }
    if all_up {
        tokio::time::sleep(std::time::Duration::from_secs(cli.idle_settle)).await;
        result = measure(cli, rt, &pods).await;
        if let (Some(cmd), Ok(m), Some(cid)) = (&cli.idle_exec, &mut result, pods[0].1.first()) {
            let r = rt
                .exec_sync(cri::ExecSyncRequest {
                    container_id: cid.clone(),
                    cmd: vec!["sh".into(), "-c".into(), cmd.clone()],
                    timeout: 30,
                })
                .await;
            let out = match r {
                Ok(r) => {
                    let r = r.into_inner();
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&r.stdout),
                        String::from_utf8_lossy(&r.stderr)
                    )
                }
                Err(e) => format!("ExecSync: {e}"),
            };
            println!("\n{} idle pod 0: {cmd}\n{out}", cli.name);
            m["idle_exec"] = serde_json::json!({"cmd": cmd, "output": out});
        }
    }
    for (id, ctrs) in &pods {
        for c in ctrs {
            let _ = rt
                .stop_container(cri::StopContainerRequest {
                    container_id: c.clone(),
                    timeout: 0,
                })
                .await;
        }
        let _ = rt
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await;
        let _ = rt
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await;
    }
    result
}

async fn measure(
    cli: &Cli,
    rt: &mut RuntimeServiceClient<tonic::transport::Channel>,
    pods: &[(String, Vec<String>)],
) -> anyhow::Result<serde_json::Value> {
    let mut per_pod = Vec::new();
    // comm -> per pod (count, rss, pss, pss_anon, pss_shmem, pss_file) summed over the
    // pod's processes of that name.
    let mut by_comm: BTreeMap<String, Vec<[u64; 6]>> = BTreeMap::new();
    let (mut rss, mut pss) = (vec![], vec![]);
    for (id, ctrs) in pods {
        let procs: Vec<ProcMem> = pod_pids(rt, id, ctrs)
            .await?
            .into_iter()
            .filter_map(proc_mem)
            .collect();
        let mut mine: BTreeMap<String, [u64; 6]> = BTreeMap::new();
        for p in &procs {
            let e = mine.entry(p.comm.clone()).or_default();
            e[0] += 1;
            e[1] += p.rss_kib;
            e[2] += p.pss_kib;
            e[3] += p.pss_anon_kib;
            e[4] += p.pss_shmem_kib;
            e[5] += p.pss_file_kib;
        }
        for (c, v) in mine {
            by_comm.entry(c).or_default().push(v);
        }
        rss.push(mib(procs.iter().map(|p| p.rss_kib).sum()));
        pss.push(mib(procs.iter().map(|p| p.pss_kib).sum()));
        per_pod.push(serde_json::json!({"pod": id, "processes": procs}));
    }
    let n = pods.len();
    println!(
        "\n{} host memory per idle pod ({n} pods, {} s after start; medians over pods)",
        cli.name, cli.idle_settle
    );
    println!(
        "{:<18} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "process", "count", "RSS MiB", "PSS MiB", "anon", "shmem", "file"
    );
    let mut procs_json = serde_json::Map::new();
    for (c, v) in &by_comm {
        let col = |i: usize| median(v.iter().map(|x| mib(x[i])).collect());
        let count = median(v.iter().map(|x| x[0] as f64).collect());
        println!(
            "{:<18} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}{}",
            c,
            count,
            col(1),
            col(2),
            col(3),
            col(4),
            col(5),
            if v.len() < n {
                format!("  (in {} of {n} pods)", v.len())
            } else {
                String::new()
            }
        );
        procs_json.insert(
            c.clone(),
            serde_json::json!({"pods": v.len(), "count": count, "rss_mib": col(1),
                "pss_mib": col(2), "pss_anon_mib": col(3), "pss_shmem_mib": col(4),
                "pss_file_mib": col(5)}),
        );
    }
    let (rss, pss) = (median(rss), median(pss));
    println!("{:<18} {:>6} {:>9.1} {:>9.1}", "pod total", "", rss, pss);
    Ok(
        serde_json::json!({"pods": n, "settle_s": cli.idle_settle, "rss_mib_median": rss,
        "pss_mib_median": pss, "processes": procs_json, "per_pod": per_pod}),
    )
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
        if !cli.no_big_pull {
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
        }
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
        let pod = pod_config(&cli, tag, &format!("bench-{i}"));
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
        let ctr = sleep_container(&spec);
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
    let mut doc = serde_json::json!({"runtime": cli.name, "handler": cli.handler,
        "iterations": cli.n, "order": b.order, "steps": json});
    if cli.idle_pods > 0 {
        match idle_memory(&cli, &mut rt, &spec, tag).await {
            Ok(m) => doc["memory"] = m,
            Err(e) => {
                eprintln!("memory step: {e:#}");
                doc["memory"] = serde_json::json!({"error": format!("{e:#}")});
            }
        }
    }
    println!("{}", serde_json::to_string(&doc)?);
    if let Some(p) = cli.json {
        std::fs::write(p, serde_json::to_vec_pretty(&doc)?)?;
    }
    // The pods' log directories (every pod is removed by now).
    let _ = std::fs::remove_dir_all(format!("/tmp/isola-bench-{tag}"));
    Ok(())
}
