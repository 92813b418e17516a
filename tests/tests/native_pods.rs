//! Native pods end to end over the CRI socket, with images pulled from a real registry:
//! logs, exit codes, args/env merging, users, read-only rootfs, capabilities, OOM kills,
//! exec, stop timeouts, shared namespaces, stats, events, restarts and shim deaths, and no
//! leaks after each.

use std::time::{Duration, Instant};

use isola_proto::cri;
use isola_tests::fixtures::*;
use isola_tests::*;
use nix::sys::signal::Signal;
use tonic::Code;

const EXITED: i32 = cri::ContainerState::ContainerExited as i32;
const RUNNING: i32 = cri::ContainerState::ContainerRunning as i32;

fn sc(
    f: impl FnOnce(&mut cri::LinuxContainerSecurityContext),
) -> Option<cri::LinuxContainerConfig> {
    let mut s = cri::LinuxContainerSecurityContext::default();
    f(&mut s);
    Some(cri::LinuxContainerConfig {
        security_context: Some(s),
        resources: None,
    })
}

async fn logs_exit_codes_and_cleanup(handler: &str) {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("logs");
    let pod = run_pod(&mut rt, pc.clone(), handler).await.expect("pod");
    let id = run(
        &mut rt,
        &pod,
        &pc,
        w.sh("c", "echo hi; echo err >&2; exit 3"),
    )
    .await;
    let st = wait_exit(&mut rt, &id, Duration::from_secs(20)).await;
    assert_eq!(st.exit_code, 3);
    assert_eq!(st.reason, "Error");
    assert!(st.started_at > 0 && st.finished_at >= st.started_at);
    let log = std::path::Path::new(&pc.log_directory).join("c.log");
    assert_eq!(st.log_path, log.display().to_string());
    let recs = log_records(&log);
    assert!(
        recs.contains(&("stdout".into(), "F".into(), "hi".into())),
        "{recs:?}"
    );
    assert!(
        recs.contains(&("stderr".into(), "F".into(), "err".into())),
        "{recs:?}"
    );

    let ok = run(&mut rt, &pod, &pc, w.sh("ok", "exit 0")).await;
    let st = wait_exit(&mut rt, &ok, Duration::from_secs(20)).await;
    assert_eq!((st.exit_code, st.reason.as_str()), (0, "Completed"));
    // A second container with the same name and attempt is AlreadyExists.
    let err = create(&mut rt, &pod, &pc, w.sh("ok", "true"))
        .await
        .expect_err("dup");
    assert_eq!(err.code(), Code::AlreadyExists);
    // Starting an exited container is a state error.
    let err = rt
        .start_container(cri::StartContainerRequest {
            container_id: ok.clone(),
        })
        .await
        .expect_err("restart");
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Container filters through the socket.
    let list = |f: cri::ContainerFilter| {
        let mut rt = rt.clone();
        async move {
            let mut v: Vec<String> = rt
                .list_containers(cri::ListContainersRequest { filter: Some(f) })
                .await
                .expect("list")
                .into_inner()
                .containers
                .into_iter()
                .map(|c| c.id)
                .collect();
            v.sort();
            v
        }
    };
    let mut both = vec![id.clone(), ok.clone()];
    both.sort();
    assert_eq!(
        list(cri::ContainerFilter {
            pod_sandbox_id: pod[..8].into(),
            ..Default::default()
        })
        .await,
        both
    );
    assert_eq!(
        list(cri::ContainerFilter {
            id: ok[..10].into(),
            ..Default::default()
        })
        .await,
        vec![ok.clone()]
    );
    assert_eq!(
        list(cri::ContainerFilter {
            state: Some(cri::ContainerStateValue { state: EXITED }),
            ..Default::default()
        })
        .await,
        both
    );
    assert!(list(cri::ContainerFilter {
        state: Some(cri::ContainerStateValue { state: RUNNING }),
        ..Default::default()
    })
    .await
    .is_empty());

    rt.remove_container(cri::RemoveContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("remove");
    let err = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        })
        .await
        .expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
    assert!(!pod_cgroups_left(&pod), "pod cgroups left behind");
}

async fn args_env_and_user_merge_with_the_image(handler: &str) {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("merge");
    let pod = run_pod(&mut rt, pc.clone(), handler).await.expect("pod");
    let base = |name: &str| cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: w.entry_image.clone(),
            ..Default::default()
        }),
        log_path: format!("{name}.log"),
        ..Default::default()
    };
    // Image Entrypoint + Cmd.
    let a = run(&mut rt, &pod, &pc, base("a")).await;
    // Args replace Cmd, env from the request overrides and adds to the image's.
    let mut b = base("b");
    b.args = vec!["echo $IMG $FOO $(id -u) $(id -g) $(id -G) $HOME".into()];
    b.envs = vec![
        cri::KeyValue {
            key: "FOO".into(),
            value: "bar".into(),
        },
        cri::KeyValue {
            key: "IMG".into(),
            value: "over".into(),
        },
    ];
    b.linux = sc(|s| {
        s.run_as_user = Some(cri::Int64Value { value: 1000 });
        s.supplemental_groups = vec![4242];
    });
    let b = run(&mut rt, &pod, &pc, b).await;
    // A user name from the image's /etc/passwd, and a working dir.
    let mut c = base("c");
    c.args = vec!["echo $(id -un) $(pwd)".into()];
    c.working_dir = "/tmp".into();
    c.linux = sc(|s| s.run_as_username = "web".into());
    let c = run(&mut rt, &pod, &pc, c).await;
    for id in [&a, &b, &c] {
        let st = wait_exit(&mut rt, id, Duration::from_secs(20)).await;
        assert_eq!(st.exit_code, 0, "container {id}");
    }
    let out = |n: &str| -> Vec<String> {
        log_records(&std::path::Path::new(&pc.log_directory).join(format!("{n}.log")))
            .into_iter()
            .map(|r| r.2)
            .collect()
    };
    assert_eq!(out("a"), vec!["from-image-cmd"]);
    // 50: `web` is in `staff` in the image's /etc/group.
    assert_eq!(out("b"), vec!["over bar 1000 1000 1000 50 4242 /home/web"]);
    assert_eq!(out("c"), vec!["web /tmp"]);
    // An unknown user name is a clear error.
    let mut d = base("d");
    d.linux = sc(|s| s.run_as_username = "nobody-here".into());
    let err = create(&mut rt, &pod, &pc, d)
        .await
        .expect_err("unknown user");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("nobody-here"), "{}", err.message());
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
}

async fn security_context_readonly_rootfs_and_capabilities(handler: &str) {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("sec");
    let pod = run_pod(&mut rt, pc.clone(), handler).await.expect("pod");
    let mut ro = w.sh(
        "ro",
        "touch /x && echo wrote; touch /tmp/y 2>&1 || true; exit 0",
    );
    ro.linux = sc(|s| s.readonly_rootfs = true);
    let ro = run(&mut rt, &pod, &pc, ro).await;
    let mut caps = w.sh("caps", "grep CapEff /proc/self/status; sleep 100");
    caps.linux = sc(|s| {
        s.capabilities = Some(cri::Capability {
            drop_capabilities: vec!["CHOWN".into(), "NET_RAW".into()],
            add_capabilities: vec!["NET_ADMIN".into()],
            ..Default::default()
        });
        s.seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        });
    });
    let caps = run(&mut rt, &pod, &pc, caps).await;
    wait_exit(&mut rt, &ro, Duration::from_secs(20)).await;
    let recs = log_records(&std::path::Path::new(&pc.log_directory).join("ro.log"));
    let all: String = recs.iter().map(|r| r.2.clone() + "\n").collect();
    assert!(!all.contains("wrote"), "wrote to a read-only rootfs: {all}");
    assert!(all.contains("Read-only file system"), "{all}");
    // CapEff: CHOWN (bit 0) and NET_RAW (13) gone, NET_ADMIN (12) there.
    let r = exec(&mut rt, &caps, &["grep", "CapEff", "/proc/self/status"], 10)
        .await
        .expect("exec");
    let text = String::from_utf8_lossy(&r.stdout);
    let hex = text.split_whitespace().nth(1).expect("CapEff value");
    let eff = u64::from_str_radix(hex, 16).expect("hex");
    assert_eq!(eff & 1, 0, "CAP_CHOWN still effective: {hex}");
    assert_eq!(eff & (1 << 13), 0, "CAP_NET_RAW still effective: {hex}");
    assert_ne!(eff & (1 << 12), 0, "CAP_NET_ADMIN missing: {hex}");
    // The runtime default seccomp profile refuses unshare for a container without
    // CAP_SYS_ADMIN... and chown is refused by the missing capability.
    let r = exec(
        &mut rt,
        &caps,
        &["sh", "-c", "touch /tmp/f && chown 1000 /tmp/f"],
        10,
    )
    .await
    .expect("exec");
    assert_ne!(r.exit_code, 0, "chown worked without CAP_CHOWN");
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
}

async fn memory_limit_ends_in_oomkilled(handler: &str) {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("oom");
    let pod = run_pod(&mut rt, pc.clone(), handler).await.expect("pod");
    let mut c = w.sh("hog", "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done");
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 32 << 20,
            ..Default::default()
        }),
        security_context: None,
    });
    let id = run(&mut rt, &pod, &pc, c).await;
    let st = wait_exit(&mut rt, &id, Duration::from_secs(60)).await;
    assert_eq!(st.reason, "OOMKilled", "{st:?}");
    assert_eq!(st.exit_code, 137);
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
}

async fn exec_sync_stop_timeout_and_shared_namespaces(handler: &str) {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("exec");
    let pod = run_pod(&mut rt, pc.clone(), handler).await.expect("pod");
    // PID 1 of the pod's PID namespace is the infra process: sh here ignores SIGTERM
    // via trap, so stop must end in SIGKILL after the timeout.
    let a = run(
        &mut rt,
        &pod,
        &pc,
        w.sh(
            "a",
            "trap 'echo got-term' TERM; while true; do sleep 1; done",
        ),
    )
    .await;
    let b = run(&mut rt, &pod, &pc, w.sh("b", "sleep 1000")).await;
    let r = exec(
        &mut rt,
        &a,
        &["sh", "-c", "echo out; echo err >&2; exit 5"],
        10,
    )
    .await
    .expect("exec");
    assert_eq!(
        (r.exit_code, r.stdout.as_slice(), r.stderr.as_slice()),
        (5, &b"out\n"[..], &b"err\n"[..])
    );
    // Timeout: DeadlineExceeded, and the process is killed.
    let start = Instant::now();
    let err = exec(&mut rt, &a, &["sh", "-c", "sleep 30; echo never"], 1)
        .await
        .expect_err("timeout");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(start.elapsed() < Duration::from_secs(10));
    let r = exec(
        &mut rt,
        &a,
        &["sh", "-c", "ps -o args | grep -c '^sleep 30$' || true"],
        10,
    )
    .await
    .expect("ps");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        "0",
        "the timed-out command and its children were killed"
    );
    // Shared IPC and PID namespaces (pod PID namespace is the default).
    let ns = |id: String, what: &'static str| {
        let mut rt = rt.clone();
        async move {
            let r = exec(
                &mut rt,
                &id,
                &["readlink", &format!("/proc/self/ns/{what}")],
                10,
            )
            .await
            .expect("readlink");
            String::from_utf8_lossy(&r.stdout).trim().to_string()
        }
    };
    assert_eq!(ns(a.clone(), "ipc").await, ns(b.clone(), "ipc").await);
    assert_eq!(ns(a.clone(), "pid").await, ns(b.clone(), "pid").await);
    assert_eq!(ns(a.clone(), "uts").await, ns(b.clone(), "uts").await);
    let r = exec(
        &mut rt,
        &a,
        &["sh", "-c", "ps -o args | grep -c '^sleep 1000$'"],
        10,
    )
    .await
    .expect("ps");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        "1",
        "b's sleep is visible from a"
    );
    // Nothing of the runtime leaks into the container: an exec'd process has only its
    // stdio (and ls's own directory handle) open.
    let r = exec(&mut rt, &b, &["sh", "-c", "ls /proc/self/fd | wc -l"], 10)
        .await
        .expect("fds");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        "4",
        "fds leaked into an exec"
    );
    let r = exec(&mut rt, &a, &["hostname"], 10)
        .await
        .expect("hostname");
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "exec");
    // Stop with a 2 s timeout: SIGTERM is trapped, SIGKILL ends it.
    let start = Instant::now();
    rt.stop_container(cri::StopContainerRequest {
        container_id: a.clone(),
        timeout: 2,
    })
    .await
    .expect("stop");
    let took = start.elapsed();
    let st = status(&mut rt, &a).await;
    assert_eq!(st.state, EXITED);
    assert_eq!(st.exit_code, 137, "{st:?}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "stop took {took:?}"
    );
    let recs = log_records(&std::path::Path::new(&pc.log_directory).join("a.log"));
    assert!(
        recs.iter().any(|r| r.2 == "got-term"),
        "SIGTERM was sent first: {recs:?}"
    );
    // Exec in an exited container is refused.
    let err = exec(&mut rt, &a, &["true"], 5).await.expect_err("exited");
    assert_eq!(err.code(), Code::FailedPrecondition);
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
}

async fn stats_update_reopen_log_and_events(handler: &str) {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let mut events = w
        .rt()
        .await
        .get_container_events(cri::GetEventsRequest {})
        .await
        .expect("events")
        .into_inner();
    let pc = w.pod("stats");
    let pod = run_pod(&mut rt, pc.clone(), handler).await.expect("pod");
    let id = run(
        &mut rt,
        &pod,
        &pc,
        w.sh(
            "s",
            "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.2; done",
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = rt
        .container_stats(cri::ContainerStatsRequest {
            container_id: id.clone(),
        })
        .await
        .expect("stats")
        .into_inner()
        .stats
        .expect("stats");
    assert!(
        s.memory
            .as_ref()
            .and_then(|m| m.working_set_bytes.as_ref())
            .map(|v| v.value)
            .unwrap_or(0)
            > 0
    );
    assert!(
        s.cpu
            .as_ref()
            .and_then(|c| c.usage_core_nano_seconds.as_ref())
            .map(|v| v.value)
            .unwrap_or(0)
            > 0
    );
    // The writable layer is measured (at least its upper directory).
    let layer = s.writable_layer.as_ref().expect("writable layer");
    assert!(
        layer.inodes_used.as_ref().map(|v| v.value).unwrap_or(0) >= 1,
        "{layer:?}"
    );
    let list = rt
        .list_container_stats(cri::ListContainerStatsRequest { filter: None })
        .await
        .expect("list stats")
        .into_inner();
    assert_eq!(list.stats.len(), 1);
    let ps = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("pod stats")
        .into_inner();
    let linux = ps.stats.expect("stats").linux.expect("linux");
    assert_eq!(linux.containers.len(), 1);
    // UpdateContainerResources reaches the cgroup.
    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: id.clone(),
        linux: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 100 << 20,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("update");
    let r = exec(&mut rt, &id, &["sh", "-c", "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max"], 10).await.expect("exec");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        (100u64 << 20).to_string()
    );
    // Log rotation: rename, reopen, new lines land in the new file.
    let log = std::path::Path::new(&pc.log_directory).join("s.log");
    std::fs::rename(&log, log.with_extension("log.1")).expect("rotate");
    rt.reopen_container_log(cri::ReopenContainerLogRequest {
        container_id: id.clone(),
    })
    .await
    .expect("reopen");
    assert!(
        eventually(Duration::from_secs(5), || async {
            !log_records(&log).is_empty()
        })
        .await,
        "no lines after reopen"
    );
    rt.stop_container(cri::StopContainerRequest {
        container_id: id.clone(),
        timeout: 5,
    })
    .await
    .expect("stop");
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("remove");
    let mut seen = Vec::new();
    while seen.len() < 6 {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("event")
            .expect("ok")
            .expect("some");
        if ev.container_id == id {
            seen.push(ev.container_event_type);
        } else {
            assert_eq!(ev.container_id, pod);
            seen.push(-1);
        }
    }
    use cri::ContainerEventType as E;
    let mine: Vec<i32> = seen.into_iter().filter(|e| *e >= 0).collect();
    assert_eq!(
        mine,
        vec![
            E::ContainerCreatedEvent as i32,
            E::ContainerStartedEvent as i32,
            E::ContainerStoppedEvent as i32,
            E::ContainerDeletedEvent as i32
        ]
    );
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
}

async fn containers_survive_agent_restarts_and_shim_death_is_noticed(handler: &str) {
    let mut w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("restart");
    let pod = run_pod(&mut rt, pc.clone(), handler).await.expect("pod");
    let long = run(&mut rt, &pod, &pc, w.sh("long", "sleep 1000")).await;
    let short = run(&mut rt, &pod, &pc, w.sh("short", "sleep 3; exit 7")).await;
    w.agent.kill9();
    tokio::time::sleep(Duration::from_secs(4)).await;
    w.agent.restart().await;
    let mut rt = w.rt().await;
    assert_eq!(status(&mut rt, &long).await.state, RUNNING);
    let r = exec(&mut rt, &long, &["echo", "alive"], 10)
        .await
        .expect("exec after restart");
    assert_eq!(r.stdout, b"alive\n");
    let st = wait_exit(&mut rt, &short, Duration::from_secs(10)).await;
    assert_eq!(
        st.exit_code, 7,
        "the exit while the agent was down is known"
    );

    // kill -9 of the shim: the pod turns NOTREADY, the running container UNKNOWN, and
    // stop/remove still clean up processes, mounts and cgroups.
    let shim = shim_pid(&mut rt, &pod).await.expect("shim");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim as i32), Signal::SIGKILL)
        .expect("kill shim");
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut rt = rt.clone();
            let pod = pod.clone();
            async move {
                pod_status(&mut rt, &pod, false)
                    .await
                    .map(|s| s.status.map(|s| s.state))
                    .ok()
                    .flatten()
                    == Some(cri::PodSandboxState::SandboxNotready as i32)
            }
        })
        .await
    );
    let st = status(&mut rt, &long).await;
    assert_eq!(st.state, cri::ContainerState::ContainerUnknown as i32);
    assert_eq!(st.reason, "ShimExited");
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
    assert!(!pod_cgroups_left(&pod), "pod cgroups left behind");
}

#[tokio::test]
async fn host_namespaces_mounts_sysctls_and_cgroup_parent() {
    let w = World::start().await;
    let mut rt = w.rt().await;
    // A pod in the host's PID and IPC namespaces, under an explicit cgroup parent, with a
    // namespaced sysctl.
    let mut pc = w.pod("hostns");
    let parent = format!("/isola-test-{}", std::process::id());
    pc.linux = Some(cri::LinuxPodSandboxConfig {
        cgroup_parent: parent.clone(),
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Node as i32,
                ipc: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod = run_pod(&mut rt, pc.clone(), "").await.expect("pod");
    // A namespaced IPC sysctl needs the pod's own IPC namespace: refused for host IPC,
    // applied in a pod of its own.
    let mut bad = pc.clone();
    bad.metadata.as_mut().expect("md").name = "hostns-sysctl".into();
    bad.metadata.as_mut().expect("md").uid = "hostns-sysctl".into();
    if let Some(l) = bad.linux.as_mut() {
        l.sysctls = [("kernel.msgmax".to_string(), "4242".to_string())].into();
    }
    let bad_pod = run_pod(&mut rt, bad.clone(), "").await.expect("pod");
    let err = create(&mut rt, &bad_pod, &bad, w.sh("x", "true"))
        .await
        .expect_err("ipc sysctl with host ipc");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("kernel.msgmax"), "{}", err.message());
    teardown(&mut rt, &bad_pod).await;
    let mut own = w.pod("sysctl");
    own.linux = Some(cri::LinuxPodSandboxConfig {
        sysctls: [("kernel.msgmax".to_string(), "4242".to_string())].into(),
        ..Default::default()
    });
    let own_pod = run_pod(&mut rt, own.clone(), "").await.expect("pod");
    let sid = run(&mut rt, &own_pod, &own, w.sh("s", "sleep 1000")).await;
    let r = exec(&mut rt, &sid, &["cat", "/proc/sys/kernel/msgmax"], 10)
        .await
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "4242");
    teardown(&mut rt, &own_pod).await;
    // A host directory mounted read-only, another read-write.
    let host = tempfile::tempdir().expect("host dir");
    std::fs::write(host.path().join("hello"), "from-host").expect("write");
    let rw = tempfile::tempdir().expect("rw dir");
    let mut c = w.sh("m", "sleep 1000");
    c.mounts = vec![
        cri::Mount {
            container_path: "/data".into(),
            host_path: host.path().display().to_string(),
            readonly: true,
            ..Default::default()
        },
        cri::Mount {
            container_path: "/out".into(),
            host_path: rw.path().display().to_string(),
            readonly: false,
            ..Default::default()
        },
    ];
    let id = run(&mut rt, &pod, &pc, c).await;
    let sh = |script: &'static str| {
        let mut rt = rt.clone();
        let id = id.clone();
        async move {
            let r = exec(&mut rt, &id, &["sh", "-c", script], 10)
                .await
                .expect("exec");
            (
                r.exit_code,
                String::from_utf8_lossy(&r.stdout).trim().to_string(),
            )
        }
    };
    assert_eq!(sh("cat /data/hello").await, (0, "from-host".into()));
    assert_ne!(
        sh("touch /data/x 2>/dev/null").await.0,
        0,
        "read-only mount written"
    );
    assert_eq!(sh("echo out > /out/f && echo ok").await, (0, "ok".into()));
    assert_eq!(
        std::fs::read_to_string(rw.path().join("f"))
            .expect("written through")
            .trim(),
        "out"
    );
    // Host PID namespace: the container sees this test process.
    let me = std::process::id();
    let (code, _) = {
        let mut rt = rt.clone();
        let r = exec(
            &mut rt,
            &id,
            &["sh", "-c", &format!("test -d /proc/{me}")],
            10,
        )
        .await
        .expect("exec");
        (r.exit_code, ())
    };
    assert_eq!(code, 0, "the host's processes are visible with hostPID");
    // Masked paths stay masked.
    // (/proc/timer_list exists on every kernel with /proc; masked, it reads empty.)
    assert_eq!(sh("wc -c < /proc/timer_list 2>&1").await.1, "0");
    assert_eq!(sh("ls /proc/acpi 2>&1 | wc -l").await.1, "0");
    // The container's cgroup lies under the requested parent.
    let st = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        })
        .await
        .expect("status");
    assert!(st.into_inner().status.is_some());
    let cg = std::path::Path::new("/sys/fs/cgroup/memory")
        .join(parent.trim_start_matches('/'))
        .join(&id);
    let cg2 = std::path::Path::new("/sys/fs/cgroup")
        .join(parent.trim_start_matches('/'))
        .join(&id);
    assert!(
        cg.exists() || cg2.exists(),
        "no cgroup at {} or {}",
        cg.display(),
        cg2.display()
    );
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
    assert!(
        !cg.exists() && !cg2.exists(),
        "container cgroup left behind"
    );
    for h in ["memory", "pids", "cpu", ""] {
        let _ = std::fs::remove_dir(
            std::path::Path::new("/sys/fs/cgroup")
                .join(h)
                .join(parent.trim_start_matches('/')),
        );
    }
}

/// RemoveImage while a container uses the image: the image goes from the lists, the
/// container keeps running on its layers, and the layers go once the container is
/// removed.
#[tokio::test]
async fn an_image_in_use_keeps_its_layers_until_the_container_goes() {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let mut images = w.images().await;
    let layers = w.agent.root().join("images").join("layers");
    let count = |d: &std::path::Path| std::fs::read_dir(d).map(|e| e.count()).unwrap_or(0);
    let pc = w.pod("inuse");
    let pod = run_pod(&mut rt, pc.clone(), "").await.expect("pod");
    let id = run(&mut rt, &pod, &pc, w.sh("c", "sleep 1000")).await;
    let before = count(&layers);
    assert!(before >= 1, "no unpacked layers in {}", layers.display());
    for image in [&w.image, &w.entry_image] {
        images
            .remove_image(cri::RemoveImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
            })
            .await
            .expect("remove image");
    }
    let listed = images
        .list_images(cri::ListImagesRequest { filter: None })
        .await
        .expect("list")
        .into_inner()
        .images;
    assert!(listed.is_empty(), "{listed:?}");
    // The container still runs on its layers.
    let r = exec(&mut rt, &id, &["cat", "/etc/passwd"], 10)
        .await
        .expect("exec");
    assert!(String::from_utf8_lossy(&r.stdout).contains("web:x:1000"));
    assert_eq!(
        count(&layers),
        before,
        "layers removed under a running container"
    );
    teardown(&mut rt, &pod).await;
    assert!(
        eventually(Duration::from_secs(10), || async { count(&layers) == 0 }).await,
        "layers left after the last user went: {}",
        count(&layers)
    );
    w.agent.assert_no_leaks();
}

isola_tests::for_each_handler!(
    logs_exit_codes_and_cleanup,
    args_env_and_user_merge_with_the_image,
    security_context_readonly_rootfs_and_capabilities,
    memory_limit_ends_in_oomkilled,
    exec_sync_stop_timeout_and_shared_namespaces,
    stats_update_reopen_log_and_events,
    containers_survive_agent_restarts_and_shim_death_is_noticed,
);
