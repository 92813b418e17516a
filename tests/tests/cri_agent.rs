//! The agent foundation, end to end over the real CRI socket: Version, Status,
//! RuntimeConfig, pod lifecycle with real shim processes, filters, errors, events, and
//! records across restarts (graceful and kill -9) and shim deaths.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use isola_proto::cri;
use isola_tests::*;
use nix::sys::signal::Signal;
use tonic::Code;

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn list(rt: &mut Runtime, filter: Option<cri::PodSandboxFilter>) -> Vec<String> {
    let mut ids: Vec<String> = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter })
        .await
        .expect("list")
        .into_inner()
        .items
        .into_iter()
        .map(|p| p.id)
        .collect();
    ids.sort();
    ids
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

async fn stop(rt: &mut Runtime, id: &str) -> Result<(), tonic::Status> {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .map(|_| ())
}

async fn remove(rt: &mut Runtime, id: &str) -> Result<(), tonic::Status> {
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .map(|_| ())
}

async fn state(rt: &mut Runtime, id: &str) -> i32 {
    pod_status(rt, id, false)
        .await
        .expect("status")
        .status
        .expect("status body")
        .state
}

const READY: i32 = cri::PodSandboxState::SandboxReady as i32;
const NOTREADY: i32 = cri::PodSandboxState::SandboxNotready as i32;

#[tokio::test]
async fn version_status_and_runtime_config() {
    let agent = Agent::start().await;
    let mut rt = agent.runtime().await;
    let v = rt
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .expect("version")
        .into_inner();
    assert_eq!(v.runtime_name, "isola");
    assert_eq!(v.runtime_api_version, "v1");
    assert!(!v.runtime_version.is_empty());

    let st = rt
        .status(cri::StatusRequest { verbose: true })
        .await
        .expect("status")
        .into_inner();
    let conds = st.status.expect("conditions").conditions;
    let runtime = conds
        .iter()
        .find(|c| c.r#type == "RuntimeReady")
        .expect("RuntimeReady");
    assert!(runtime.status, "runtime not ready: {runtime:?}");
    let network = conds
        .iter()
        .find(|c| c.r#type == "NetworkReady")
        .expect("NetworkReady");
    // The agent's CNI conf dir holds no network config: the condition must say so, with a reason.
    assert!(!network.status);
    assert_eq!(network.reason, "NetworkPluginNotReady");
    assert!(!network.message.is_empty());
    let handlers: Vec<_> = st
        .runtime_handlers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(handlers, vec!["native", "vm"]);
    let config: serde_json::Value = serde_json::from_str(&st.info["config"]).expect("config json");
    assert_eq!(config["socket"], agent.socket().display().to_string());
    let classes: serde_json::Value =
        serde_json::from_str(&st.info["runtimeClasses"]).expect("classes json");
    assert_eq!(classes[1]["handler"], "vm");
    assert_eq!(classes[1]["settings"]["hypervisor"], "auto");
    // Without verbose there is no info.
    let st = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .expect("status")
        .into_inner();
    assert!(st.info.is_empty());

    let rc = rt
        .runtime_config(cri::RuntimeConfigRequest {})
        .await
        .expect("runtime config")
        .into_inner();
    assert_eq!(
        rc.linux.expect("linux").cgroup_driver,
        cri::CgroupDriver::Cgroupfs as i32
    );

    // The socket is mode 0660.
    let mode = std::fs::metadata(agent.socket())
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
}

#[tokio::test]
async fn systemd_driver_and_pod_cidr_are_configurable() {
    let agent = Agent::start_with(AgentOptions {
        config: "cgroup_driver = \"systemd\"".into(),
    })
    .await;
    let mut rt = agent.runtime().await;
    let rc = rt
        .runtime_config(cri::RuntimeConfigRequest {})
        .await
        .expect("runtime config")
        .into_inner();
    assert_eq!(
        rc.linux.expect("linux").cgroup_driver,
        cri::CgroupDriver::Systemd as i32
    );
    let update = |cidr: &str| cri::UpdateRuntimeConfigRequest {
        runtime_config: Some(cri::RuntimeConfig {
            network_config: Some(cri::NetworkConfig {
                pod_cidr: cidr.into(),
            }),
        }),
    };
    rt.update_runtime_config(update("10.244.1.0/24"))
        .await
        .expect("update");
    let err = rt
        .update_runtime_config(update("10.244.1.0/99"))
        .await
        .expect_err("bad cidr");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("pod_cidr"), "{}", err.message());
    let st = rt
        .status(cri::StatusRequest { verbose: true })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(st.info["podCIDR"], "\"10.244.1.0/24\"");
}

#[tokio::test]
async fn pod_lifecycle_with_a_real_shim() {
    let agent = Agent::start().await;
    let mut rt = agent.runtime().await;
    let id = run_pod(&mut rt, pod_config("web"), "").await.expect("run");
    assert_eq!(id.len(), 64);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));

    let st = pod_status(&mut rt, &id, true).await.expect("status");
    let s = st.status.expect("status body");
    assert_eq!(s.state, READY);
    assert_eq!(s.runtime_handler, "native");
    let md = s.metadata.expect("metadata");
    assert_eq!(
        (md.name.as_str(), md.namespace.as_str(), md.attempt),
        ("web", "default", 0)
    );
    assert_eq!(s.labels["app"], "web");
    assert_eq!(s.annotations["isola.test/annotation"], "yes");
    assert!(s.created_at > 0);
    let shim = shim_pid(&mut rt, &id)
        .await
        .expect("shim pid in verbose info");
    assert!(alive(shim), "shim {shim} is not running");
    assert_eq!(agent.processes(), vec![shim]);

    // A prefix resolves to the pod.
    let st = pod_status(&mut rt, &id[..12], false)
        .await
        .expect("status by prefix");
    assert_eq!(st.status.expect("body").id, id);

    stop(&mut rt, &id).await.expect("stop");
    assert_eq!(state(&mut rt, &id).await, NOTREADY);
    assert!(
        eventually(Duration::from_secs(5), || async { !alive(shim) }).await,
        "shim survived stop"
    );
    stop(&mut rt, &id).await.expect("stop is idempotent");

    remove(&mut rt, &id).await.expect("remove");
    let err = pod_status(&mut rt, &id, false).await.expect_err("removed");
    assert_eq!(err.code(), Code::NotFound);
    remove(&mut rt, &id).await.expect("remove is idempotent");
    assert!(list(&mut rt, None).await.is_empty());
    agent.assert_no_leaks();

    // Removing a ready pod stops it first.
    let id = run_pod(&mut rt, pod_config("web2"), "native")
        .await
        .expect("run");
    let shim = shim_pid(&mut rt, &id).await.expect("shim pid");
    remove(&mut rt, &id).await.expect("remove ready pod");
    assert!(!alive(shim));
    agent.assert_no_leaks();
}

#[tokio::test]
async fn pod_filters() {
    let agent = Agent::start().await;
    let mut rt = agent.runtime().await;
    let mut c1 = pod_config("a");
    c1.labels = labels(&[("app", "web"), ("tier", "front")]);
    let mut c2 = pod_config("b");
    c2.labels = labels(&[("app", "web"), ("tier", "back")]);
    let mut c3 = pod_config("c");
    c3.labels = labels(&[("app", "db")]);
    let a = run_pod(&mut rt, c1, "").await.expect("a");
    let b = run_pod(&mut rt, c2, "").await.expect("b");
    let c = run_pod(&mut rt, c3, "native").await.expect("c");
    stop(&mut rt, &c).await.expect("stop c");

    assert_eq!(
        list(&mut rt, None).await,
        sorted(vec![a.clone(), b.clone(), c.clone()])
    );
    let by_id = |id: &str| cri::PodSandboxFilter {
        id: id.into(),
        ..Default::default()
    };
    assert_eq!(list(&mut rt, Some(by_id(&a))).await, vec![a.clone()]);
    assert_eq!(list(&mut rt, Some(by_id(&b[..10]))).await, vec![b.clone()]);
    assert!(list(&mut rt, Some(by_id("ffffffffffffffff0000")))
        .await
        .is_empty());
    let by_state = |s: i32| cri::PodSandboxFilter {
        state: Some(cri::PodSandboxStateValue { state: s }),
        ..Default::default()
    };
    assert_eq!(
        list(&mut rt, Some(by_state(READY))).await,
        sorted(vec![a.clone(), b.clone()])
    );
    assert_eq!(
        list(&mut rt, Some(by_state(NOTREADY))).await,
        vec![c.clone()]
    );
    let by_labels = |l: &[(&str, &str)]| cri::PodSandboxFilter {
        label_selector: labels(l),
        ..Default::default()
    };
    assert_eq!(
        list(&mut rt, Some(by_labels(&[("app", "web")]))).await,
        sorted(vec![a.clone(), b.clone()])
    );
    assert_eq!(
        list(
            &mut rt,
            Some(by_labels(&[("app", "web"), ("tier", "back")]))
        )
        .await,
        vec![b.clone()]
    );
    assert!(list(&mut rt, Some(by_labels(&[("app", "nope")])))
        .await
        .is_empty());
    // Every field at once: all must match.
    let all = cri::PodSandboxFilter {
        id: a[..8].into(),
        state: Some(cri::PodSandboxStateValue { state: READY }),
        label_selector: labels(&[("tier", "front")]),
    };
    assert_eq!(list(&mut rt, Some(all.clone())).await, vec![a.clone()]);
    let mismatch = cri::PodSandboxFilter {
        state: Some(cri::PodSandboxStateValue { state: NOTREADY }),
        ..all
    };
    assert!(list(&mut rt, Some(mismatch)).await.is_empty());
    // A malformed selector is refused, naming the field.
    let err = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(by_labels(&[("bad key!", "x")])),
        })
        .await
        .expect_err("bad selector");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("label_selector"),
        "{}",
        err.message()
    );
    let err = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                label_selector: labels(&[("x", "-bad-")]),
                ..Default::default()
            }),
        })
        .await
        .expect_err("bad container selector");
    assert_eq!(err.code(), Code::InvalidArgument);
    // Container filters on a pod with no containers.
    let cs = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: a.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("list containers")
        .into_inner();
    assert!(cs.containers.is_empty());
    for id in [a, b, c] {
        remove(&mut rt, &id).await.expect("remove");
    }
    agent.assert_no_leaks();
}

#[tokio::test]
async fn duplicate_pods_are_already_exists() {
    let agent = Agent::start().await;
    let mut rt = agent.runtime().await;
    let config = pod_config("dup");
    let first = run_pod(&mut rt, config.clone(), "").await.expect("first");
    let err = run_pod(&mut rt, config.clone(), "native")
        .await
        .expect_err("duplicate");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(
        err.message().contains(&first),
        "names the holder: {}",
        err.message()
    );
    // The holder is untouched and only one shim runs.
    assert_eq!(agent.processes().len(), 1);
    // Another attempt is another pod.
    let mut next = config.clone();
    next.metadata.as_mut().expect("md").attempt = 1;
    let second = run_pod(&mut rt, next, "").await.expect("attempt 1");
    // Once removed, the name is free again.
    remove(&mut rt, &first).await.expect("remove");
    let third = run_pod(&mut rt, config, "").await.expect("reuse name");
    for id in [second, third] {
        remove(&mut rt, &id).await.expect("remove");
    }
    agent.assert_no_leaks();
}

#[tokio::test]
async fn unknown_and_ambiguous_ids_are_not_found() {
    let agent = Agent::start().await;
    let mut rt = agent.runtime().await;
    let unknown = "0123456789abcdef".repeat(4);
    let err = pod_status(&mut rt, &unknown, false)
        .await
        .expect_err("unknown pod");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(&unknown));
    let err = stop(&mut rt, &unknown).await.expect_err("stop unknown");
    assert_eq!(err.code(), Code::NotFound);
    let err = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: unknown.clone(),
            verbose: false,
        })
        .await
        .expect_err("unknown container");
    assert_eq!(err.code(), Code::NotFound);
    for (name, result) in [
        (
            "StartContainer",
            rt.start_container(cri::StartContainerRequest {
                container_id: unknown.clone(),
            })
            .await
            .map(|_| ()),
        ),
        (
            "StopContainer",
            rt.stop_container(cri::StopContainerRequest {
                container_id: unknown.clone(),
                timeout: 1,
            })
            .await
            .map(|_| ()),
        ),
        (
            "ExecSync",
            rt.exec_sync(cri::ExecSyncRequest {
                container_id: unknown.clone(),
                cmd: vec!["true".into()],
                timeout: 1,
            })
            .await
            .map(|_| ()),
        ),
        (
            "ContainerStats",
            rt.container_stats(cri::ContainerStatsRequest {
                container_id: unknown.clone(),
            })
            .await
            .map(|_| ()),
        ),
        (
            "PodSandboxStats",
            rt.pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: unknown.clone(),
            })
            .await
            .map(|_| ()),
        ),
    ] {
        let err = result.expect_err(name);
        assert_eq!(err.code(), Code::NotFound, "{name}: {}", err.message());
    }
    // RemoveContainer/RemovePodSandbox of unknown ids succeed (idempotent).
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: unknown.clone(),
    })
    .await
    .expect("remove unknown container");
    remove(&mut rt, &unknown).await.expect("remove unknown pod");

    // Make two pods whose ids share a first character: that prefix is ambiguous.
    let mut ids: Vec<String> = Vec::new();
    let (x, y) = loop {
        let id = run_pod(&mut rt, pod_config(&format!("amb{}", ids.len())), "")
            .await
            .expect("run");
        if let Some(other) = ids.iter().find(|o| o.as_bytes()[0] == id.as_bytes()[0]) {
            let other = other.clone();
            ids.push(id.clone());
            break (other, id);
        }
        ids.push(id);
        assert!(ids.len() <= 17, "pigeonhole");
    };
    let prefix = &x[..1];
    let err = pod_status(&mut rt, prefix, false)
        .await
        .expect_err("ambiguous");
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("ambiguous")
            && err.message().contains(&x)
            && err.message().contains(&y),
        "names the matches: {}",
        err.message()
    );
    for id in ids {
        remove(&mut rt, &id).await.expect("remove");
    }
    agent.assert_no_leaks();
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument() {
    let agent = Agent::start().await;
    let mut rt = agent.runtime().await;
    let err = run_pod(&mut rt, pod_config("x"), "kata")
        .await
        .expect_err("unknown handler");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("\"kata\"") && err.message().contains("native, vm"),
        "{}",
        err.message()
    );

    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: None,
            runtime_handler: String::new(),
        })
        .await
        .expect_err("no config");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("config"));

    let mut no_md = pod_config("x");
    no_md.metadata = None;
    let err = run_pod(&mut rt, no_md, "").await.expect_err("no metadata");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("config.metadata"),
        "{}",
        err.message()
    );

    for field in ["name", "namespace", "uid"] {
        let mut c = pod_config("x");
        let md = c.metadata.as_mut().expect("md");
        match field {
            "name" => md.name.clear(),
            "namespace" => md.namespace.clear(),
            _ => md.uid.clear(),
        }
        let err = run_pod(&mut rt, c, "").await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains(&format!("config.metadata.{field}")),
            "{}",
            err.message()
        );
    }

    // A vm pod cannot share the host's namespaces.
    let mut host = pod_config("hostnet");
    host.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                network: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let err = run_pod(&mut rt, host, "vm")
        .await
        .expect_err("vm host network");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("network"), "{}", err.message());

    // CreateContainer: missing metadata, empty image, empty pod id.
    let pod = run_pod(&mut rt, pod_config("pod"), "").await.expect("pod");
    let good = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "c".into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: "busybox".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let create = |pod: &str, config: cri::ContainerConfig| cri::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(config),
        sandbox_config: Some(pod_config("pod")),
    };
    let mut no_md = good.clone();
    no_md.metadata = None;
    let err = rt
        .create_container(create(&pod, no_md))
        .await
        .expect_err("no md");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("config.metadata"),
        "{}",
        err.message()
    );
    let mut no_image = good.clone();
    no_image.image = None;
    let err = rt
        .create_container(create(&pod, no_image))
        .await
        .expect_err("no image");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("config.image.image"),
        "{}",
        err.message()
    );
    let err = rt
        .create_container(create("", good.clone()))
        .await
        .expect_err("no pod");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: String::new(),
            cmd: vec![],
            timeout: 0,
        })
        .await
        .expect_err("empty id");
    assert_eq!(err.code(), Code::InvalidArgument);

    // A valid request for an image that was never pulled: NotFound naming the image,
    // and nothing left behind.
    let err = rt
        .create_container(create(&pod, good))
        .await
        .expect_err("image not pulled");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("busybox"), "{}", err.message());
    let cs = rt
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .expect("list")
        .into_inner();
    assert!(cs.containers.is_empty());
    remove(&mut rt, &pod).await.expect("remove");
    agent.assert_no_leaks();
}

#[tokio::test]
async fn unbuilt_capabilities_answer_unimplemented() {
    let mut agent = Agent::start().await;
    let mut rt = agent.runtime().await;
    let err = rt
        .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
        .await
        .expect_err("metrics");
    assert_eq!(err.code(), Code::Unimplemented);
    // A vm class whose guest kernel is missing: RunPodSandbox says what is missing and
    // leaves nothing behind.
    let class = include_str!("../../runtime-classes/vm.toml")
        .replace("handler = \"vm\"", "handler = \"vmbroken\"")
        .replace("/usr/share/isola/guest/vmlinux", "/nonexistent/vmlinux");
    std::fs::write(
        agent.dir().join("runtime-classes").join("vmbroken.toml"),
        class,
    )
    .expect("class file");
    agent.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    agent.restart().await;
    let mut rt = agent.runtime().await;
    let err = run_pod(&mut rt, pod_config("vm"), "vmbroken")
        .await
        .expect_err("vm without a kernel");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("/nonexistent/vmlinux"),
        "{}",
        err.message()
    );
    assert!(list(&mut rt, None).await.is_empty());
    agent.assert_no_leaks();
}

#[tokio::test]
async fn container_events_follow_the_sandbox_lifecycle() {
    let agent = Agent::start().await;
    let mut rt = agent.runtime().await;
    let mut stream = agent
        .runtime()
        .await
        .get_container_events(cri::GetEventsRequest {})
        .await
        .expect("events")
        .into_inner();
    let id = run_pod(&mut rt, pod_config("ev"), "").await.expect("run");
    stop(&mut rt, &id).await.expect("stop");
    remove(&mut rt, &id).await.expect("remove");
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("event within 10s")
            .expect("stream ok")
            .expect("an event");
        assert_eq!(ev.container_id, id);
        assert!(ev.created_at > 0);
        let sb = ev.pod_sandbox_status.expect("sandbox status in event");
        assert_eq!(sb.id, id);
        seen.push(ev.container_event_type);
    }
    use cri::ContainerEventType as E;
    assert_eq!(
        seen,
        vec![
            E::ContainerCreatedEvent as i32,
            E::ContainerStartedEvent as i32,
            E::ContainerStoppedEvent as i32,
            E::ContainerDeletedEvent as i32
        ]
    );
}

#[tokio::test]
async fn records_and_shims_survive_agent_restarts() {
    let mut agent = Agent::start().await;
    let mut rt = agent.runtime().await;
    let a = run_pod(&mut rt, pod_config("keep"), "").await.expect("a");
    let b = run_pod(&mut rt, pod_config("stopped"), "")
        .await
        .expect("b");
    stop(&mut rt, &b).await.expect("stop b");
    let shim_a = shim_pid(&mut rt, &a).await.expect("shim a");
    let before = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .expect("list")
        .into_inner()
        .items;

    for how in ["SIGTERM", "SIGKILL"] {
        let code = agent.signal_and_wait(if how == "SIGTERM" {
            Signal::SIGTERM
        } else {
            Signal::SIGKILL
        });
        if how == "SIGTERM" {
            assert_eq!(code, Some(0), "graceful exit code");
            assert!(!agent.socket().exists(), "socket removed on graceful exit");
        }
        assert!(alive(shim_a), "the shim must outlive isolad ({how})");
        agent.restart().await;
        let mut rt = agent.runtime().await;
        let after = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .expect("list")
            .into_inner()
            .items;
        assert_eq!(after.len(), before.len(), "{how}");
        for p in &before {
            let q = after.iter().find(|q| q.id == p.id).expect("pod kept");
            assert_eq!(q.state, p.state, "{how}: state of {}", p.id);
            assert_eq!(q.metadata, p.metadata);
            assert_eq!(q.labels, p.labels);
            assert_eq!(q.created_at, p.created_at);
        }
        assert_eq!(
            shim_pid(&mut rt, &a).await,
            Some(shim_a),
            "reconnected to the same shim ({how})"
        );
        // The name stays reserved across restarts.
        let err = run_pod(&mut rt, pod_config("keep"), "")
            .await
            .expect_err("dup after restart");
        assert_eq!(err.code(), Code::AlreadyExists);
    }
    // The reconnected shim still obeys: stop and remove clean up.
    let mut rt = agent.runtime().await;
    stop(&mut rt, &a).await.expect("stop a");
    assert!(eventually(Duration::from_secs(5), || async { !alive(shim_a) }).await);
    remove(&mut rt, &a).await.expect("remove a");
    remove(&mut rt, &b).await.expect("remove b");
    agent.assert_no_leaks();
}

#[tokio::test]
async fn a_dead_shim_makes_its_pod_not_ready() {
    let mut agent = Agent::start().await;
    let mut rt = agent.runtime().await;
    let id = run_pod(&mut rt, pod_config("victim"), "")
        .await
        .expect("run");
    let other = run_pod(&mut rt, pod_config("bystander"), "")
        .await
        .expect("run");
    let shim = shim_pid(&mut rt, &id).await.expect("shim");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim as i32), Signal::SIGKILL)
        .expect("kill shim");
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut rt = rt.clone();
            let id = id.clone();
            async move { state(&mut rt, &id).await == NOTREADY }
        })
        .await,
        "pod did not turn NOTREADY after its shim died"
    );
    let st = pod_status(&mut rt, &id, true).await.expect("status");
    assert!(
        st.info["info"].contains("ShimExited"),
        "{}",
        st.info["info"]
    );
    assert_eq!(
        state(&mut rt, &other).await,
        READY,
        "other pods are unaffected"
    );
    stop(&mut rt, &id).await.expect("stop after shim death");
    remove(&mut rt, &id).await.expect("remove after shim death");

    // A shim that dies while the agent is down is noticed at restart.
    let shim2 = shim_pid(&mut rt, &other).await.expect("shim");
    agent.kill9();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim2 as i32), Signal::SIGKILL)
        .expect("kill shim");
    assert!(eventually(Duration::from_secs(5), || async { !alive(shim2) }).await);
    agent.restart().await;
    let mut rt = agent.runtime().await;
    assert_eq!(state(&mut rt, &other).await, NOTREADY);
    remove(&mut rt, &other).await.expect("remove");
    agent.assert_no_leaks();
}

#[tokio::test]
async fn cli_prints_version_and_default_config() {
    let out = std::process::Command::new(binary("isolad"))
        .arg("--version")
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("isolad "));
    let out = std::process::Command::new(binary("isolad"))
        .args(["config", "default"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("socket = \"/run/isola/isola.sock\""));
    // The printed config is accepted as a config file.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("c.toml"), text.as_bytes()).expect("write");
    let bad = std::process::Command::new(binary("isolad"))
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("missing.toml"));
}
