//! Native pods' device passthrough and seccomp profiles end to end over the CRI socket:
//! what a container given a host device or a seccomp profile can and cannot do, and
//! what a bad request is told, with no leaks after each.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use isola_proto::cri;
use isola_tests::fixtures::*;
use isola_tests::*;
use tonic::Code;

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

/// A pod config whose containers each have their own PID namespace, as kubelet asks
/// unless shareProcessNamespace is set.
fn pod_config(w: &World, name: &str) -> cri::PodSandboxConfig {
    let mut pc = w.pod(name);
    pc.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Container as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    pc
}

fn device(host: &str, container: &str, permissions: &str) -> cri::Device {
    cri::Device {
        host_path: host.into(),
        container_path: container.into(),
        permissions: permissions.into(),
    }
}

/// `major:minor` of a host device node in hex, as busybox `stat -c %t:%T` prints it.
fn host_numbers(path: &str) -> String {
    let rdev = std::fs::metadata(path).expect("host device").rdev();
    format!("{:x}:{:x}", libc::major(rdev), libc::minor(rdev))
}

/// Runs `sh -c script` in a container: (exit code, stdout, stderr), trimmed.
async fn sh(rt: &Runtime, id: &str, script: &str) -> (i32, String, String) {
    let mut rt = rt.clone();
    let r = exec(&mut rt, id, &["sh", "-c", script], 10)
        .await
        .expect("exec");
    (
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).trim().to_string(),
        String::from_utf8_lossy(&r.stderr).trim().to_string(),
    )
}

/// The ids of a pod's containers.
async fn containers_of(rt: &mut Runtime, pod: &str) -> Vec<String> {
    rt.list_containers(cri::ListContainersRequest {
        filter: Some(cri::ContainerFilter {
            pod_sandbox_id: pod.into(),
            ..Default::default()
        }),
    })
    .await
    .expect("list")
    .into_inner()
    .containers
    .into_iter()
    .map(|c| c.id)
    .collect()
}

/// Mount points under the agent's directories (root and state).
fn agent_mounts(w: &World) -> Vec<String> {
    let dir = w
        .agent
        .root()
        .parent()
        .expect("agent dir")
        .to_string_lossy()
        .into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|p| p.starts_with(&dir))
        .collect()
}

/// A host device that is not one of the devices every container gets (null, zero, full,
/// random, urandom, tty, ptmx, tun), so that the device cgroup decides its access.
fn non_default_device() -> Option<&'static str> {
    ["/dev/fuse", "/dev/loop-control", "/dev/kmsg"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

#[tokio::test]
async fn devices_appear_with_their_numbers_and_the_cgroup_enforces_permissions() {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = pod_config(&w, "devices");
    let pod = run_pod(&mut rt, pc.clone(), "").await.expect("pod");
    let ro_host = non_default_device().expect("no /dev/fuse, /dev/loop-control or /dev/kmsg");
    let mut c = w.sh("dev", "sleep 1000");
    c.devices = vec![
        device("/dev/null", "/dev/isola-null", "rwm"),
        device(ro_host, "/dev/isola-ro", "r"),
    ];
    let id = run(&mut rt, &pod, &pc, c).await;

    // The nodes are there, as character devices with the host's numbers.
    let (code, out, err) = sh(
        &rt,
        &id,
        "busybox stat -c '%t:%T %F' /dev/isola-null /dev/isola-ro",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "{} character special file\n{} character special file",
            host_numbers("/dev/null"),
            host_numbers(ro_host)
        )
    );
    assert_eq!(host_numbers("/dev/null"), "1:3");
    // The rw device takes writes; the "r" one can be opened for reading only.
    assert_eq!(
        sh(&rt, &id, "echo hi > /dev/isola-null && echo wrote").await,
        (0, "wrote".into(), String::new())
    );
    let (code, _, err) = sh(&rt, &id, "echo hi > /dev/isola-ro").await;
    assert_ne!(code, 0, "wrote to a read-only device");
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(
        sh(&rt, &id, "head -c 0 < /dev/isola-ro && echo opened").await,
        (0, "opened".into(), String::new())
    );
    // A device the container was not given is refused even when it makes the node
    // itself (CAP_MKNOD is a default capability): 1:11 is /dev/kmsg.
    let (code, _, err) = sh(
        &rt,
        &id,
        "busybox mknod /tmp/kmsg c 1 11 && head -c 0 < /tmp/kmsg",
    )
    .await;
    assert_ne!(code, 0, "opened a device the container was not given");
    assert!(err.contains("Operation not permitted"), "{err}");
    // The host's devices are not in an unprivileged container.
    assert_ne!(sh(&rt, &id, &format!("test -e {ro_host}")).await.0, 0);

    // A privileged container gets every host device (as with runc), usable.
    let mut p = w.sh("priv", "sleep 1000");
    p.linux = sc(|s| s.privileged = true);
    let priv_id = run(&mut rt, &pod, &pc, p).await;
    let (code, out, err) = sh(&rt, &priv_id, &format!("busybox stat -c %t:%T {ro_host}")).await;
    assert_eq!((code, out), (0, host_numbers(ro_host)), "{err}");
    assert_eq!(
        sh(
            &rt,
            &priv_id,
            &format!("head -c 0 < {ro_host} && echo opened")
        )
        .await,
        (0, "opened".into(), String::new())
    );

    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
}

#[tokio::test]
async fn bad_devices_are_invalid_arguments_naming_them() {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = pod_config(&w, "baddev");
    let pod = run_pod(&mut rt, pc.clone(), "").await.expect("pod");
    let cases = [
        (
            device("/dev/isola-no-such-device", "/dev/x", "rw"),
            "/dev/isola-no-such-device",
        ),
        (device("/dev/null", "/dev/x", "rwx"), "permissions \"rwx\""),
        (device("/dev/null", "/etc/x", "rw"), "/etc/x"),
        (device("/etc/hostname", "/dev/x", "r"), "not a device node"),
    ];
    for (d, needle) in cases {
        let mut c = w.sh("c", "true");
        c.devices = vec![d.clone()];
        let err = create(&mut rt, &pod, &pc, c)
            .await
            .expect_err("a bad device was accepted");
        assert_eq!(err.code(), Code::InvalidArgument, "{d:?}: {err:?}");
        assert!(err.message().contains(needle), "{d:?}: {}", err.message());
        assert!(
            err.message().contains("config.devices"),
            "{}",
            err.message()
        );
    }
    // Nothing was left: no container, no mounts; the name is free again.
    assert!(containers_of(&mut rt, &pod).await.is_empty());
    assert!(agent_mounts(&w).iter().all(|m| !m.contains("/containers/")));
    let id = run(&mut rt, &pod, &pc, w.sh("c", "exit 0")).await;
    assert_eq!(
        wait_exit(&mut rt, &id, Duration::from_secs(20))
            .await
            .exit_code,
        0
    );
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
}

fn profile(kind: cri::security_profile::ProfileType, path: &str) -> cri::SecurityProfile {
    cri::SecurityProfile {
        profile_type: kind as i32,
        localhost_ref: path.into(),
    }
}

#[tokio::test]
async fn seccomp_localhost_runtime_default_and_unconfined() {
    use cri::security_profile::ProfileType;
    let w = World::start().await;
    let mut rt = w.rt().await;
    let dir = tempfile::tempdir().expect("profiles");
    // An OCI profile that allows everything but mkdir.
    let no_mkdir = dir.path().join("no-mkdir.json");
    std::fs::write(
        &no_mkdir,
        serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
        })
        .to_string(),
    )
    .expect("write profile");
    // The same in Docker's format: archMap, and a rule for CAP_SYS_ADMIN holders only,
    // which this container is not.
    let docker = dir.path().join("docker.json");
    std::fs::write(
        &docker,
        serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}],
            "syscalls": [
                {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1, "includes": {"caps": ["CAP_SYS_ADMIN"]}},
            ],
        })
        .to_string(),
    )
    .expect("write profile");
    let pc = pod_config(&w, "seccomp");
    let pod = run_pod(&mut rt, pc.clone(), "").await.expect("pod");

    let mut c = w.sh("local", "sleep 1000");
    let path = no_mkdir.display().to_string();
    c.linux = sc(|s| s.seccomp = Some(profile(ProfileType::Localhost, &path)));
    let local = run(&mut rt, &pod, &pc, c).await;
    let (code, _, err) = sh(&rt, &local, "mkdir /tmp/x").await;
    assert_ne!(code, 0, "mkdir worked under a profile refusing it");
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(
        sh(&rt, &local, "touch /tmp/y && ls /tmp && test ! -e /tmp/x").await,
        (0, "y".into(), String::new())
    );

    let mut c = w.sh("docker", "sleep 1000");
    let path = docker.display().to_string();
    c.linux = sc(|s| s.seccomp = Some(profile(ProfileType::Localhost, &path)));
    let dock = run(&mut rt, &pod, &pc, c).await;
    let (code, _, err) = sh(&rt, &dock, "mkdir /tmp/x").await;
    assert_ne!(code, 0, "mkdir worked under a Docker profile refusing it");
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(
        sh(&rt, &dock, "cd /tmp && pwd").await,
        (0, "/tmp".into(), String::new()),
        "a rule for CAP_SYS_ADMIN holders applied to a container without it"
    );

    // swapoff of a missing file: ENOENT for a process with CAP_SYS_ADMIN, EPERM when the
    // runtime default profile refuses the call (it always does).
    let mut c = w.sh("default", "sleep 1000");
    c.linux = sc(|s| {
        s.seccomp = Some(profile(ProfileType::RuntimeDefault, ""));
        s.capabilities = Some(cri::Capability {
            add_capabilities: vec!["SYS_ADMIN".into()],
            ..Default::default()
        });
    });
    let default = run(&mut rt, &pod, &pc, c).await;
    let (code, _, err) = sh(&rt, &default, "busybox swapoff /tmp/none").await;
    assert_ne!(code, 0);
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(
        sh(&rt, &default, "mkdir /tmp/x && echo made").await,
        (0, "made".into(), String::new())
    );

    let mut c = w.sh("unconfined", "sleep 1000");
    c.linux = sc(|s| {
        s.seccomp = Some(profile(ProfileType::Unconfined, ""));
        s.capabilities = Some(cri::Capability {
            add_capabilities: vec!["SYS_ADMIN".into()],
            ..Default::default()
        });
    });
    let unconfined = run(&mut rt, &pod, &pc, c).await;
    let (code, _, err) = sh(&rt, &unconfined, "busybox swapoff /tmp/none").await;
    assert_ne!(code, 0);
    assert!(err.contains("No such file or directory"), "{err}");
    assert_eq!(
        sh(&rt, &unconfined, "mkdir /tmp/x && echo made").await,
        (0, "made".into(), String::new())
    );

    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
}

#[tokio::test]
async fn bad_seccomp_profiles_are_invalid_arguments_naming_the_path() {
    use cri::security_profile::ProfileType;
    let w = World::start().await;
    let mut rt = w.rt().await;
    let dir = tempfile::tempdir().expect("profiles");
    let missing = dir.path().join("missing.json").display().to_string();
    let malformed = dir.path().join("malformed.json");
    std::fs::write(&malformed, "{\"defaultAction\": ").expect("write");
    let malformed = malformed.display().to_string();
    let bad_action = dir.path().join("bad-action.json");
    std::fs::write(&bad_action, r#"{"defaultAction": "SCMP_ACT_PERHAPS"}"#).expect("write");
    let bad_action = bad_action.display().to_string();
    let pc = pod_config(&w, "badseccomp");
    let pod = run_pod(&mut rt, pc.clone(), "").await.expect("pod");
    for (path, why) in [
        (missing.as_str(), "no such file"),
        (malformed.as_str(), "not valid JSON"),
        (bad_action.as_str(), "not a valid seccomp profile"),
        ("relative/profile.json", "absolute path"),
    ] {
        let mut c = w.sh("c", "true");
        c.linux = sc(|s| s.seccomp = Some(profile(ProfileType::Localhost, path)));
        let err = create(&mut rt, &pod, &pc, c)
            .await
            .expect_err("a bad profile was accepted");
        assert_eq!(err.code(), Code::InvalidArgument, "{path}: {err:?}");
        assert!(err.message().contains(path), "{path}: {}", err.message());
        assert!(err.message().contains(why), "{path}: {}", err.message());
        assert!(err.message().contains("seccomp"), "{}", err.message());
    }
    // Nothing was left: no container, no mounts; the name is free again.
    assert!(containers_of(&mut rt, &pod).await.is_empty());
    assert!(agent_mounts(&w).iter().all(|m| !m.contains("/containers/")));
    let id = run(&mut rt, &pod, &pc, w.sh("c", "exit 0")).await;
    assert_eq!(
        wait_exit(&mut rt, &id, Duration::from_secs(20))
            .await
            .exit_code,
        0
    );
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
}

/// A container config with a memory limit.
fn limited(mut c: cri::ContainerConfig, bytes: i64) -> cri::ContainerConfig {
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: None,
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: bytes,
            ..Default::default()
        }),
    });
    c
}

/// The memory limit a container sees in its /sys/fs/cgroup (v1 bind, or v2 namespace).
const READ_LIMIT: &str =
    "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max";

/// In a pod PID namespace (the default namespace options, as crictl and critest ask),
/// a container's PID is not a host PID: creating containers must not depend on which
/// PIDs the host has (on cgroup v1 libcontainer's `cgroup` mount looked its parent up
/// in the host's /proc by that PID), and each sees its own cgroup.
#[tokio::test]
async fn pod_pid_namespace_containers_get_their_own_cgroups_whatever_their_pid() {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("podpid");
    assert!(pc.linux.is_none(), "default namespace options wanted");
    let pod = run_pod(&mut rt, pc.clone(), "").await.expect("pod");
    let long = run(
        &mut rt,
        &pod,
        &pc,
        limited(w.sh("long", "sleep 1000"), 96 << 20),
    )
    .await;
    assert_eq!(
        sh(&rt, &long, READ_LIMIT).await,
        (0, (96u64 << 20).to_string(), String::new())
    );
    if !std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        // cgroup v1: the hierarchies are there, read-only, in a read-only tmpfs.
        let (code, out, err) = sh(&rt, &long, "ls /sys/fs/cgroup").await;
        assert_eq!(code, 0, "{err}");
        for h in ["memory", "cpu", "cpuacct", "pids"] {
            assert!(out.lines().any(|l| l == h), "{h} missing: {out}");
        }
        assert!(!out.lines().any(|l| l == "systemd"), "{out}");
        for f in [
            "/sys/fs/cgroup/x",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        ] {
            let (code, _, _) = sh(&rt, &long, &format!("echo 1 > {f}")).await;
            assert_ne!(code, 0, "{f} is writable");
        }
    }
    let log_dir = std::path::Path::new(&pc.log_directory);
    for i in 0..20i64 {
        // Each round uses up PIDs of the pod's namespace: the exec's and the new
        // container's.
        let (code, out, err) = sh(&rt, &long, "echo $$").await;
        assert_eq!(code, 0, "round {i}: {err}");
        assert!(out.parse::<u32>().is_ok(), "round {i}: {out}");
        let limit = (32 + i) << 20;
        let name = format!("short{i}");
        let id = create(&mut rt, &pod, &pc, limited(w.sh(&name, READ_LIMIT), limit))
            .await
            .unwrap_or_else(|e| panic!("round {i}: create: {e:?}"));
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("round {i}: start: {e:?}"));
        let st = wait_exit(&mut rt, &id, Duration::from_secs(20)).await;
        assert_eq!(st.exit_code, 0, "round {i}");
        let lines: Vec<String> = log_records(&log_dir.join(format!("{name}.log")))
            .into_iter()
            .map(|(_, _, l)| l)
            .collect();
        assert_eq!(lines, [limit.to_string()], "round {i}");
        rt.remove_container(cri::RemoveContainerRequest { container_id: id })
            .await
            .expect("remove");
    }
    // The long-running container still sees its own limit.
    assert_eq!(
        sh(&rt, &long, READ_LIMIT).await,
        (0, (96u64 << 20).to_string(), String::new())
    );
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
}

/// AppArmor where the host has none (this one): RuntimeDefault and Unconfined run
/// unconfined; a Localhost profile cannot be honoured and is refused naming it.
#[tokio::test]
async fn apparmor_profiles_without_apparmor_on_the_host() {
    let enabled = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .map(|s| s.trim() == "Y")
        .unwrap_or(false);
    assert!(
        !enabled,
        "this test covers hosts without AppArmor; the unit tests in isola-container cover the rest"
    );
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("aa");
    let pod = run_pod(&mut rt, pc.clone(), "").await.expect("pod");
    let with = |name: &str, kind: cri::security_profile::ProfileType, r: &str| {
        let mut c = w.sh(name, "cat /proc/self/attr/current 2>/dev/null; echo ran");
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                apparmor: Some(cri::SecurityProfile {
                    profile_type: kind as i32,
                    localhost_ref: r.into(),
                }),
                ..Default::default()
            }),
            resources: None,
        });
        c
    };
    use cri::security_profile::ProfileType;
    let a = run(
        &mut rt,
        &pod,
        &pc,
        with("rd", ProfileType::RuntimeDefault, ""),
    )
    .await;
    let b = run(&mut rt, &pod, &pc, with("un", ProfileType::Unconfined, "")).await;
    for id in [&a, &b] {
        let st = wait_exit(&mut rt, id, std::time::Duration::from_secs(20)).await;
        assert_eq!(st.exit_code, 0, "{st:?}");
    }
    let err = create(
        &mut rt,
        &pod,
        &pc,
        with("lh", ProfileType::Localhost, "my-profile"),
    )
    .await
    .expect_err("localhost without apparmor");
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "{}",
        err.message()
    );
    assert!(err.message().contains("my-profile"), "{}", err.message());
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
}
