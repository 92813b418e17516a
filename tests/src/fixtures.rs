//! Images and pods for end-to-end tests of containers: a busybox image built from
//! Debian's busybox-static, pushed to a real registry, pulled by the agent over the CRI.

use std::time::Duration;

use isola_proto::cri;

use crate::registry::{busybox, Compression, ImageSpec, Registry, Tar};
use crate::{Agent, AgentOptions, Images, Runtime};

const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "id", "sleep", "grep", "ls", "touch", "env", "readlink", "ps", "head",
    "wc", "kill", "true", "false", "mkdir", "nc", "stty", "hostname", "uname", "awk", "tr", "dd",
    "httpd", "ip", "wget",
];

/// A one-layer busybox image: /bin/busybox and applet links, /etc/passwd with `web`
/// (1000), /tmp; config Env and Cmd as given.
pub fn busybox_image(config: serde_json::Value) -> anyhow::Result<ImageSpec> {
    busybox_image_compressed(config, Compression::Gzip)
}

/// [`busybox_image`] with its layer compressed as given.
pub fn busybox_image_compressed(
    config: serde_json::Value,
    compression: Compression,
) -> anyhow::Result<ImageSpec> {
    let mut t = Tar::new()
        .dir("bin", 0o755)
        .dir("etc", 0o755)
        .dir("tmp", 0o1777)
        .dir("home", 0o755)
        .dir("home/web", 0o755)
        .file("bin/busybox", &busybox()?, 0o755)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1000:web:/home/web:/bin/sh\n",
            0o644,
        )
        .file(
            "etc/group",
            b"root:x:0:\nweb:x:1000:\nstaff:x:50:web\n",
            0o644,
        );
    for a in APPLETS {
        t = t.symlink(&format!("bin/{a}"), "busybox");
    }
    let mut spec = ImageSpec::new(vec![(t.finish(), compression)]);
    spec.config = config;
    Ok(spec)
}

/// A registry with `busybox:latest` (plain config) and `busybox:entry` (Entrypoint
/// `sh -c`, Cmd `echo from-image-cmd`, Env `IMG=img`, StopSignal SIGUSR1).
pub struct World {
    /// The registry.
    pub registry: Registry,
    /// The agent, configured to reach it.
    pub agent: Agent,
    /// `host:port/busybox:latest`.
    pub image: String,
    /// `host:port/busybox:entry`.
    pub entry_image: String,
    /// Pod log directory.
    pub logs: tempfile::TempDir,
}

impl World {
    /// Starts a registry and an agent, pushes and pulls the images.
    pub async fn start() -> World {
        World::start_with("").await
    }

    /// A world with `busybox:latest` only, its layer zstd-compressed (zstd is C code, fast
    /// even in a debug build, unlike gzip here), and `config` (TOML) added to the agent's
    /// config: for slow machines (the L1 rig runs under TCG). `entry_image` is the plain
    /// one.
    pub async fn start_lean(config: &str) -> World {
        let registry = Registry::start().expect("registry");
        let plain = busybox_image_compressed(
            serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}),
            Compression::Zstd,
        )
        .expect("image");
        registry
            .push_image("busybox", "latest", &plain)
            .expect("push");
        World::with_images(registry, config, "latest", "latest").await
    }

    /// As [`World::start`], with `config` (TOML) added to the agent's config.
    pub async fn start_with(config: &str) -> World {
        let registry = Registry::start().expect("registry");
        let plain = busybox_image(serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}))
            .expect("image");
        registry
            .push_image("busybox", "latest", &plain)
            .expect("push");
        let entry = busybox_image(serde_json::json!({
            "Env": ["PATH=/bin", "IMG=img"],
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo from-image-cmd"],
            "StopSignal": "SIGUSR1",
        }))
        .expect("image");
        registry
            .push_image("busybox", "entry", &entry)
            .expect("push");
        World::with_images(registry, config, "latest", "entry").await
    }

    /// Starts the agent (plain HTTP to `registry`, plus `config`) and pulls
    /// `busybox:<plain>` and `busybox:<entry>` from the registry.
    async fn with_images(registry: Registry, config: &str, plain: &str, entry: &str) -> World {
        let agent = Agent::start_with(AgentOptions {
            config: format!(
                "{config}\n[registry]\ninsecure_registries = [{:?}]\n",
                registry.addr
            ),
        })
        .await;
        let image = registry.image("busybox", plain);
        let entry_image = registry.image("busybox", entry);
        let mut images = agent.images().await;
        let mut wanted = vec![&image];
        if entry_image != image {
            wanted.push(&entry_image);
        }
        for i in wanted {
            images
                .pull_image(cri::PullImageRequest {
                    image: Some(cri::ImageSpec {
                        image: i.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .expect("pull");
        }
        World {
            registry,
            agent,
            image,
            entry_image,
            logs: tempfile::tempdir().expect("logs"),
        }
    }

    /// A runtime client.
    pub async fn rt(&self) -> Runtime {
        self.agent.runtime().await
    }

    /// An image client.
    pub async fn images(&self) -> Images {
        self.agent.images().await
    }

    /// A pod config logging under this world's log dir.
    pub fn pod(&self, name: &str) -> cri::PodSandboxConfig {
        let mut c = crate::pod_config(name);
        c.log_directory = self.logs.path().join(name).display().to_string();
        c
    }

    /// A container config running `sh -c script` from the plain image.
    pub fn sh(&self, name: &str, script: &str) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            log_path: format!("{name}.log"),
            linux: Some(cri::LinuxContainerConfig::default()),
            ..Default::default()
        }
    }
}

/// Creates and starts a container; returns its id.
pub async fn run(
    rt: &mut Runtime,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    c: cri::ContainerConfig,
) -> String {
    let id = create(rt, pod, pod_config, c)
        .await
        .expect("create container");
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("start container");
    id
}

/// Creates a container.
pub async fn create(
    rt: &mut Runtime,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    c: cri::ContainerConfig,
) -> Result<String, tonic::Status> {
    rt.create_container(cri::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(c),
        sandbox_config: Some(pod_config.clone()),
    })
    .await
    .map(|r| r.into_inner().container_id)
}

/// A container's status.
pub async fn status(rt: &mut Runtime, id: &str) -> cri::ContainerStatus {
    rt.container_status(cri::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .expect("status")
    .into_inner()
    .status
    .expect("status body")
}

/// Waits until a container has exited; returns its status.
pub async fn wait_exit(rt: &mut Runtime, id: &str, timeout: Duration) -> cri::ContainerStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let st = status(rt, id).await;
        if st.state == cri::ContainerState::ContainerExited as i32 {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "container {id} still {:?} after {timeout:?}",
            st.state
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// ExecSync.
pub async fn exec(
    rt: &mut Runtime,
    id: &str,
    cmd: &[&str],
    timeout: i64,
) -> Result<cri::ExecSyncResponse, tonic::Status> {
    rt.exec_sync(cri::ExecSyncRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout,
    })
    .await
    .map(|r| r.into_inner())
}

/// The CRI log records of a file: (stream, tag, content).
pub fn log_records(path: &std::path::Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut it = l.splitn(4, ' ');
            let ts = it.next().unwrap_or_default();
            assert!(
                ts.len() == 30 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
                "bad CRI timestamp in {l:?}"
            );
            (
                it.next().unwrap_or_default().to_string(),
                it.next().unwrap_or_default().to_string(),
                it.next().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Stops and removes a pod.
pub async fn teardown(rt: &mut Runtime, pod: &str) {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("stop pod");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("remove pod");
}

/// Cgroup directories under /isola/<pod> left in the memory hierarchy (v1) or unified.
pub fn pod_cgroups_left(pod: &str) -> bool {
    [
        format!("/sys/fs/cgroup/memory/isola/{pod}"),
        format!("/sys/fs/cgroup/pids/isola/{pod}"),
        format!("/sys/fs/cgroup/isola/{pod}"),
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists())
}
