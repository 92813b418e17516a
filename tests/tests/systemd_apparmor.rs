//! Native pods on a node with systemd as PID 1, cgroup v2 and AppArmor: the systemd
//! cgroup driver (kubelet's `--cgroup-driver=systemd`), the cgroupfs driver on the
//! unified hierarchy, and AppArmor profiles (RuntimeDefault, Localhost, Unconfined,
//! privileged). This host has none of that (cgroup v1 hybrid, no systemd, no AppArmor),
//! so [`systemd_cgroups_and_apparmor_in_l1`] boots an L1 machine with systemd
//! ([`isola_tests::l1`]) and runs the `l1_*` tests of this file there, over isolad's
//! real CRI socket. The `l1_*` tests are `#[ignore]`d on the host and refuse to run
//! outside L1. [`systemd_driver_on_cgroup_v1_in_l1`] boots L1 again with systemd on the
//! legacy cgroup v1 hierarchies.
//!
//! Run: `cargo test -p isola-tests --test systemd_apparmor` (as root, after
//! `cargo build --workspace --bins`; ~4 + ~1 min under TCG: L1's systemd is up in
//! ~10-20 s, each agent with its image ~20 s, each container ~10 s). Add `-- --nocapture` to see L1's
//! progress lines (`L1: ...`) and its console on failure.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use isola_proto::cri;
use isola_tests::fixtures::{exec, run, status, teardown, wait_exit, World};
use isola_tests::{eventually, run_pod};

/// The `l1_*` tests run in L1 (one after the other: L1 has 2 vCPUs).
const L1_TESTS: &[&str] = &["l1_systemd_driver", "l1_cgroupfs_driver_and_apparmor"];

/// One L1 at a time (the tests of this binary run in parallel threads; the machine
/// has 2 cores).
static L1: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn systemd_cgroups_and_apparmor_in_l1() {
    let _one = L1.lock().unwrap_or_else(|p| p.into_inner());
    let exe = std::env::current_exe().expect("current_exe");
    let command = format!(
        "{} --ignored --exact --test-threads=1 --nocapture {}",
        exe.display(),
        L1_TESTS.join(" ")
    );
    let run = isola_tests::l1::run(&command, Duration::from_secs(900)).unwrap_or_else(|e| {
        panic!("L1 rig: {e:#}");
    });
    eprintln!(
        "L1: {:.0}s in all, systemd up after {:?}s",
        run.elapsed.as_secs_f64(),
        run.boot_seconds()
    );
    // libtest's summary: every l1_* test ran and passed.
    let summary = format!("test result: ok. {} passed; 0 failed", L1_TESTS.len());
    let failed = run.rc() != Some(0) || !run.console.contains(&summary);
    assert!(
        !failed,
        "the L1 tests failed (rc {:?}); L1's console:\n{}",
        run.rc(),
        run.console
    );
}

/// The systemd driver on a node whose systemd runs the legacy cgroup v1 hierarchies
/// (`systemd.unified_cgroup_hierarchy=0`): libcontainer cannot start scopes there, so
/// isola makes the scopes' cgroups itself
/// ([`systemd_driver_where_systemd_does_not_manage_cgroups`], run in L1).
#[test]
fn systemd_driver_on_cgroup_v1_in_l1() {
    let _one = L1.lock().unwrap_or_else(|p| p.into_inner());
    let exe = std::env::current_exe().expect("current_exe");
    let command = format!(
        "test -e /sys/fs/cgroup/memory/memory.limit_in_bytes || {{ echo 'L1 is not on cgroup v1'; exit 1; }}; \
         {} --exact --test-threads=1 --nocapture systemd_driver_where_systemd_does_not_manage_cgroups",
        exe.display()
    );
    let run = isola_tests::l1::run_with(
        &command,
        "systemd.unified_cgroup_hierarchy=0 SYSTEMD_CGROUP_ENABLE_LEGACY_FORCE=1",
        Duration::from_secs(600),
    )
    .unwrap_or_else(|e| panic!("L1 rig: {e:#}"));
    eprintln!("L1 (cgroup v1): {:.0}s in all", run.elapsed.as_secs_f64());
    assert!(
        run.rc() == Some(0) && run.console.contains("test result: ok. 1 passed; 0 failed"),
        "the test failed in L1 on cgroup v1 (rc {:?}); L1's console:\n{}",
        run.rc(),
        run.console
    );
}

/// Fails unless running inside the L1 rig (with systemd, cgroup v2 and AppArmor).
fn in_l1() {
    assert!(
        std::env::var_os("ISOLA_L1").is_some(),
        "this test runs inside the L1 rig only: cargo test -p isola-tests --test systemd_apparmor systemd_cgroups_and_apparmor_in_l1"
    );
    assert!(
        Path::new("/run/systemd/system").is_dir(),
        "L1 is not running systemd"
    );
    assert!(
        Path::new("/sys/fs/cgroup/cgroup.controllers").exists(),
        "L1 is not on cgroup v2"
    );
}

fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text.trim().to_string())
}

/// `systemctl show -p <prop> --value <unit>`.
fn unit_prop(unit: &str, prop: &str) -> String {
    sh(&format!("systemctl show -p {prop} --value {unit}")).1
}

/// The `isola-*` scopes systemd knows (loaded, any state).
fn isola_scopes() -> Vec<String> {
    sh("systemctl list-units --all --plain --no-legend --type=scope 'isola-*'")
        .1
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn cg_file(cgroup: &str, file: &str) -> String {
    std::fs::read_to_string(
        Path::new("/sys/fs/cgroup")
            .join(cgroup.trim_start_matches('/'))
            .join(file),
    )
    .unwrap_or_else(|e| format!("<{cgroup}/{file}: {e}>"))
    .trim()
    .to_string()
}

/// Creates a pod slice through systemd's D-Bus API, as kubelet's systemd cgroup
/// manager does before RunPodSandbox (with pod-level limits for a burstable pod).
fn kubelet_slice(name: &str, memory_max: Option<u64>, tasks_max: Option<u64>) {
    let mut props = vec!["Description s \"isola test pod slice\"".to_string()];
    if let Some(m) = memory_max {
        props.push(format!("MemoryAccounting b true MemoryMax t {m}"));
    }
    if let Some(t) = tasks_max {
        props.push(format!("TasksAccounting b true TasksMax t {t}"));
    }
    let n = 1 + memory_max.is_some() as usize * 2 + tasks_max.is_some() as usize * 2;
    let (ok, out) = sh(&format!(
        "busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager StartTransientUnit 'ssa(sv)a(sa(sv))' {name} replace {n} {} 0",
        props.join(" ")
    ));
    assert!(ok, "creating {name}: {out}");
    assert!(
        eventually_sync(Duration::from_secs(10), || unit_prop(name, "ActiveState")
            == "active"),
        "{name} is not active: {}",
        unit_prop(name, "ActiveState")
    );
}

fn eventually_sync(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn limits(memory: i64, quota: i64) -> cri::LinuxContainerConfig {
    cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: memory,
            cpu_quota: quota,
            cpu_period: if quota > 0 { 100_000 } else { 0 },
            cpu_shares: 512,
            ..Default::default()
        }),
        security_context: None,
    }
}

fn pod_with_parent(w: &World, name: &str, parent: &str) -> cri::PodSandboxConfig {
    let mut pc = w.pod(name);
    pc.linux = Some(cri::LinuxPodSandboxConfig {
        cgroup_parent: parent.into(),
        ..Default::default()
    });
    pc
}

async fn stats_of(rt: &mut isola_tests::Runtime, id: &str) -> cri::ContainerStats {
    rt.container_stats(cri::ContainerStatsRequest {
        container_id: id.into(),
    })
    .await
    .expect("container stats")
    .into_inner()
    .stats
    .expect("stats body")
}

fn working_set(s: &cri::ContainerStats) -> u64 {
    s.memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map(|v| v.value)
        .unwrap_or(0)
}

fn cpu(s: &cri::ContainerStats) -> u64 {
    s.cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map(|v| v.value)
        .unwrap_or(0)
}

/// The cgroup (relative to /sys/fs/cgroup) a process is in, from /proc/<pid>/cgroup.
fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .unwrap_or_default()
}

/// kubelet --cgroup-driver=systemd: a burstable pod whose slice kubelet made (with a
/// pod-level memory limit and TasksMax), containers with limits in `isola-<id>.scope`
/// under it, the infra process in a scope of its own there, stats, update, exec, OOM,
/// and nothing of isola left in systemd after Stop/Remove.
#[tokio::test]
#[ignore = "runs inside the L1 rig: systemd_cgroups_and_apparmor_in_l1"]
async fn l1_systemd_driver() {
    let (w, progress) = l1_world("cgroup_driver = \"systemd\"").await;
    containers_in_scopes_of_the_pod_slice(&w).await;
    progress.done("kubelet's slice");
    without_a_kubelet_slice_and_bad_parents(&w).await;
    progress.done("systemd driver");
}

/// kubelet --cgroup-driver=cgroupfs on the unified hierarchy, and AppArmor (one agent
/// for both: each agent and image pull costs time under TCG).
#[tokio::test]
#[ignore = "runs inside the L1 rig: systemd_cgroups_and_apparmor_in_l1"]
async fn l1_cgroupfs_driver_and_apparmor() {
    let (w, progress) = l1_world("").await;
    cgroupfs_driver_on_cgroup_v2(&w).await;
    progress.done("cgroupfs driver");
    apparmor_profiles_are_enforced(&w).await;
    progress.done("AppArmor");
}

/// ContainerStats of a running container show memory and CPU within 10 s.
async fn assert_stats_arrive(rt: &mut isola_tests::Runtime, id: &str) {
    let arrived = eventually(Duration::from_secs(10), || {
        let mut rt = rt.clone();
        let id = id.to_string();
        async move {
            let s = stats_of(&mut rt, &id).await;
            working_set(&s) > 0 && cpu(&s) > 0
        }
    })
    .await;
    assert!(
        arrived,
        "ContainerStats stays empty: {:?}",
        stats_of(rt, id).await
    );
}

/// Time since an L1 test started, printed after each part (the rig shows it: under TCG
/// the parts take tens of seconds each).
struct Progress(std::time::Instant);

impl Progress {
    fn done(&self, what: &str) {
        eprintln!("L1: {what} done after {:?}", self.0.elapsed());
    }
}

/// Inside L1: an agent with `config` and the test image.
async fn l1_world(config: &str) -> (World, Progress) {
    in_l1();
    let progress = Progress(std::time::Instant::now());
    let w = World::start_lean(config).await;
    progress.done("agent and image");
    (w, progress)
}

async fn containers_in_scopes_of_the_pod_slice(w: &World) {
    let mut rt = w.rt().await;
    let rc = rt
        .runtime_config(cri::RuntimeConfigRequest {})
        .await
        .expect("RuntimeConfig")
        .into_inner();
    assert_eq!(
        rc.linux.expect("linux").cgroup_driver,
        cri::CgroupDriver::Systemd as i32
    );

    let slice = "kubepods-burstable-pod1234_abcd.slice";
    let slice_path =
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_abcd.slice";
    kubelet_slice(slice, Some(512 << 20), Some(200));
    assert_eq!(
        cg_file(slice_path, "memory.max"),
        (512u64 << 20).to_string()
    );
    assert_eq!(cg_file(slice_path, "pids.max"), "200");

    let pc = pod_with_parent(w, "sd", slice);
    let pod = run_pod(&mut rt, pc.clone(), "")
        .await
        .expect("RunPodSandbox");
    // The infra process (the pod's pause) sits in a scope of the pod slice, as runc
    // puts the sandbox container in cri-containerd-<id>.scope.
    let infra_scope = format!("isola-{pod}.scope");
    assert_eq!(
        unit_prop(&infra_scope, "ActiveState"),
        "active",
        "{infra_scope}"
    );
    assert_eq!(unit_prop(&infra_scope, "Slice"), slice);

    let mut c = w.sh("app", "while true; do echo tick; sleep 1; done");
    c.linux = Some(limits(64 << 20, 50_000));
    let id = run(&mut rt, &pod, &pc, c).await;
    let scope = format!("isola-{id}.scope");
    let cgroup = format!("{slice_path}/{scope}");
    assert_eq!(unit_prop(&scope, "ActiveState"), "active", "{scope}");
    assert_eq!(unit_prop(&scope, "Slice"), slice);
    assert_eq!(unit_prop(&scope, "ControlGroup"), cgroup);
    assert_eq!(cg_file(&cgroup, "memory.max"), (64u64 << 20).to_string());
    assert_eq!(cg_file(&cgroup, "cpu.max"), "50000 100000");
    let procs = cg_file(&cgroup, "cgroup.procs");
    let pid: u32 = procs
        .lines()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no process in {cgroup}: {procs}"));
    assert_eq!(cgroup_of(pid), cgroup);
    // The container sees its own cgroup as its root (cgroup namespace) with its limit.
    let r = exec(
        &mut rt,
        &id,
        &[
            "sh",
            "-c",
            "cat /proc/self/cgroup; cat /sys/fs/cgroup/memory.max",
        ],
        10,
    )
    .await
    .expect("ExecSync");
    assert_eq!(r.exit_code, 0, "{r:?}");
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("0::/"), "{out}");
    assert!(out.contains(&(64u64 << 20).to_string()), "{out}");

    // Stats from the scope's cgroup.
    assert_stats_arrive(&mut rt, &id).await;
    let ps = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("PodSandboxStats")
        .into_inner()
        .stats
        .expect("stats")
        .linux
        .expect("linux");
    assert_eq!(ps.containers.len(), 1);
    let pod_mem = ps
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map(|v| v.value)
        .unwrap_or(0);
    assert!(pod_mem > 0, "pod stats from the slice: {ps:?}");

    // UpdateContainerResources: the cgroup and systemd's view of the unit.
    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: id.clone(),
        linux: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 96 << 20,
            cpu_quota: 20_000,
            cpu_period: 100_000,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("UpdateContainerResources");
    assert_eq!(cg_file(&cgroup, "memory.max"), (96u64 << 20).to_string());
    assert_eq!(cg_file(&cgroup, "cpu.max"), "20000 100000");
    assert_eq!(unit_prop(&scope, "MemoryMax"), (96u64 << 20).to_string());
    // A daemon-reload makes systemd re-apply unit properties: the update survives.
    assert!(sh("systemctl daemon-reload").0);
    assert_eq!(cg_file(&cgroup, "memory.max"), (96u64 << 20).to_string());

    // A container over its limit is OOMKilled.
    let mut hog = w.sh("hog", "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done");
    hog.linux = Some(limits(32 << 20, 0));
    let hog_id = run(&mut rt, &pod, &pc, hog).await;
    let st = wait_exit(&mut rt, &hog_id, Duration::from_secs(120)).await;
    assert_eq!(st.reason, "OOMKilled", "{st:?}");
    assert_eq!(st.exit_code, 137, "{st:?}");

    // Stop and remove: the scopes go, kubelet's slice stays for kubelet to remove.
    rt.stop_container(cri::StopContainerRequest {
        container_id: id.clone(),
        timeout: 5,
    })
    .await
    .expect("StopContainer");
    assert_eq!(
        status(&mut rt, &id).await.state,
        cri::ContainerState::ContainerExited as i32
    );
    teardown(&mut rt, &pod).await;
    assert!(
        eventually_sync(Duration::from_secs(10), || isola_scopes().is_empty()),
        "scopes left: {:?}",
        isola_scopes()
    );
    assert!(
        !Path::new("/sys/fs/cgroup")
            .join(cgroup.trim_start_matches('/'))
            .exists(),
        "{cgroup} left"
    );
    assert_eq!(unit_prop(slice, "ActiveState"), "active");
    w.agent.assert_no_leaks();
    assert!(sh(&format!("systemctl stop {slice}")).0);
}

/// crictl with the systemd driver: a slice nobody made (systemd makes it as the parent
/// of the scopes), a pod without cgroup_parent (system.slice, as CRI-O), and parents
/// that do not fit the configured driver refused with InvalidArgument.
async fn without_a_kubelet_slice_and_bad_parents(w: &World) {
    let mut rt = w.rt().await;
    let slice = "kubepods-besteffort-pod99.slice";
    let pc = pod_with_parent(w, "be", slice);
    let pod = run_pod(&mut rt, pc.clone(), "")
        .await
        .expect("RunPodSandbox");
    let id = run(&mut rt, &pod, &pc, w.sh("app", "sleep 600")).await;
    let scope = format!("isola-{id}.scope");
    assert_eq!(
        unit_prop(&scope, "ControlGroup"),
        format!("/kubepods.slice/kubepods-besteffort.slice/{slice}/{scope}")
    );
    let r = exec(&mut rt, &id, &["echo", "hi"], 10)
        .await
        .expect("ExecSync");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "hi\n");
    // The shim dies (kill -9): the pod turns NotReady, and Stop/Remove still clean up
    // the container's and the infra process's scopes.
    let shim = isola_tests::shim_pid(&mut rt, &pod)
        .await
        .expect("shim pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the shim");
    assert!(
        eventually(Duration::from_secs(30), || {
            let mut rt = rt.clone();
            let pod = pod.clone();
            async move {
                isola_tests::pod_status(&mut rt, &pod, false)
                    .await
                    .ok()
                    .and_then(|s| s.status)
                    .map(|s| s.state)
                    == Some(cri::PodSandboxState::SandboxNotready as i32)
            }
        })
        .await,
        "the pod stays ready after its shim died"
    );
    teardown(&mut rt, &pod).await;
    assert!(
        eventually_sync(Duration::from_secs(10), || isola_scopes().is_empty()),
        "scopes left after the shim died: {:?}",
        isola_scopes()
    );

    // No cgroup_parent: system.slice.
    let pc = w.pod("noparent");
    let pod = run_pod(&mut rt, pc.clone(), "")
        .await
        .expect("RunPodSandbox");
    let id = run(&mut rt, &pod, &pc, w.sh("app", "sleep 600")).await;
    let scope = format!("isola-{id}.scope");
    assert_eq!(unit_prop(&scope, "Slice"), "system.slice");
    teardown(&mut rt, &pod).await;
    assert!(
        eventually_sync(Duration::from_secs(10), || isola_scopes().is_empty()),
        "scopes left: {:?}",
        isola_scopes()
    );

    // A cgroupfs path under the systemd driver, and malformed slices.
    for parent in [
        "/kubepods/besteffort/pod1",
        "kube--pods.slice",
        "a/b.slice",
        "-x.slice",
    ] {
        let err = run_pod(&mut rt, pod_with_parent(w, "bad", parent), "")
            .await
            .expect_err(parent);
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{parent}: {err:?}"
        );
        assert!(err.message().contains("cgroup_parent"), "{err:?}");
    }
    w.agent.assert_no_leaks();
}

/// kubelet --cgroup-driver=cgroupfs on the unified hierarchy: the pod cgroup kubelet
/// made, limits in the container's cgroup below it, stats, update, OOM, cleanup; a
/// systemd slice under the cgroupfs driver is refused.
async fn cgroupfs_driver_on_cgroup_v2(w: &World) {
    let mut rt = w.rt().await;
    let parent = "/kubepods/burstable/pod5678";
    let dir = Path::new("/sys/fs/cgroup").join(parent.trim_start_matches('/'));
    // kubelet makes the pod cgroup, enabling the controllers on the way down.
    for d in [
        "/sys/fs/cgroup/kubepods",
        "/sys/fs/cgroup/kubepods/burstable",
    ] {
        std::fs::create_dir_all(d).expect("mkdir pod cgroup");
    }
    std::fs::create_dir_all(&dir).expect("mkdir pod cgroup");
    for d in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/kubepods",
        "/sys/fs/cgroup/kubepods/burstable",
    ] {
        std::fs::write(format!("{d}/cgroup.subtree_control"), "+cpu +memory +pids")
            .unwrap_or_else(|e| panic!("{d}: {e}"));
    }
    std::fs::write(dir.join("memory.max"), (256u64 << 20).to_string()).expect("pod memory.max");

    let pc = pod_with_parent(w, "fs", parent);
    let pod = run_pod(&mut rt, pc.clone(), "")
        .await
        .expect("RunPodSandbox");
    let mut c = w.sh("app", "while true; do echo tick; sleep 1; done");
    c.linux = Some(limits(64 << 20, 50_000));
    let id = run(&mut rt, &pod, &pc, c).await;
    let cgroup = format!("{parent}/{id}");
    assert_eq!(cg_file(&cgroup, "memory.max"), (64u64 << 20).to_string());
    assert_eq!(cg_file(&cgroup, "cpu.max"), "50000 100000");
    assert_stats_arrive(&mut rt, &id).await;
    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: id.clone(),
        linux: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 96 << 20,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("UpdateContainerResources");
    assert_eq!(cg_file(&cgroup, "memory.max"), (96u64 << 20).to_string());
    let mut hog = w.sh("hog", "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done");
    hog.linux = Some(limits(32 << 20, 0));
    let hog_id = run(&mut rt, &pod, &pc, hog).await;
    let st = wait_exit(&mut rt, &hog_id, Duration::from_secs(120)).await;
    assert_eq!(st.reason, "OOMKilled", "{st:?}");
    teardown(&mut rt, &pod).await;
    let left: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "cgroups left under {parent}: {left:?}");

    let err = run_pod(
        &mut rt,
        pod_with_parent(w, "bad", "kubepods-besteffort-pod1.slice"),
        "",
    )
    .await
    .expect_err("a slice under the cgroupfs driver");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    w.agent.assert_no_leaks();
    let _ = std::fs::remove_dir(&dir);
}

fn apparmor(kind: cri::security_profile::ProfileType, name: &str) -> Option<cri::SecurityProfile> {
    Some(cri::SecurityProfile {
        profile_type: kind as i32,
        localhost_ref: name.into(),
    })
}

// No includes: compiling abstractions/base takes long under TCG.
const LOCALHOST_PROFILE: &str =
    "profile isola-test-localhost flags=(attach_disconnected,mediate_deleted) {
  file,
  capability,
  network,
  deny /etc/hostname r,
}
";

/// AppArmor: isola-default (deploy/apparmor) loaded as install.sh loads it; containers
/// run confined under RuntimeDefault (and by default), in their exec'd processes too;
/// what the profile denies is denied (mount with CAP_SYS_ADMIN, which the same
/// container Unconfined may do); Localhost names a loaded profile; one not loaded is
/// InvalidArgument; Unconfined and privileged run unconfined.
async fn apparmor_profiles_are_enforced(w: &World) {
    use cri::security_profile::ProfileType;
    assert_eq!(
        std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
            .unwrap_or_default()
            .trim(),
        "Y",
        "AppArmor is not enabled in L1"
    );
    let profile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/apparmor/isola-default");
    let loading = std::time::Instant::now();
    let (ok, out) = sh(&format!("apparmor_parser -r {}", profile.display()));
    assert!(
        ok,
        "apparmor_parser (Debian's apparmor package) loading {}: {out}",
        profile.display()
    );
    let local = std::env::temp_dir().join("isola-test-localhost");
    std::fs::write(&local, LOCALHOST_PROFILE).expect("write profile");
    let (ok, out) = sh(&format!("apparmor_parser -r {}", local.display()));
    assert!(ok, "loading the test profile: {out}");
    eprintln!("L1: AppArmor profiles loaded in {:?}", loading.elapsed());

    let mut rt = w.rt().await;
    let pc = w.pod("aa");
    let pod = run_pod(&mut rt, pc.clone(), "")
        .await
        .expect("RunPodSandbox");
    let attr = "cat /proc/self/attr/current; echo; sleep 600";
    let probe = "cat /proc/self/attr/current; echo; mkdir -p /mnt/t; mount -t tmpfs none /mnt/t 2>/dev/null && echo mounted || echo mount-refused; cat /etc/hostname >/dev/null 2>&1 && echo hostname-read || echo hostname-denied";
    let cases: Vec<(&str, Option<cri::SecurityProfile>, &str, bool)> = vec![
        (
            "default",
            apparmor(ProfileType::RuntimeDefault, ""),
            "isola-default (enforce)",
            false,
        ),
        ("unset", None, "isola-default (enforce)", false),
        (
            "unconfined",
            apparmor(ProfileType::Unconfined, ""),
            "unconfined",
            false,
        ),
        (
            "privileged",
            apparmor(ProfileType::RuntimeDefault, ""),
            "unconfined",
            true,
        ),
        (
            "local",
            apparmor(ProfileType::Localhost, "isola-test-localhost"),
            "isola-test-localhost (enforce)",
            false,
        ),
    ];
    for (name, profile, want, privileged) in cases {
        let case = std::time::Instant::now();
        let mut c = w.sh(name, attr);
        c.linux = Some(cri::LinuxContainerConfig {
            resources: None,
            security_context: Some(cri::LinuxContainerSecurityContext {
                apparmor: profile,
                privileged,
                capabilities: Some(cri::Capability {
                    add_capabilities: vec!["SYS_ADMIN".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        });
        let id = run(&mut rt, &pod, &pc, c).await;
        eprintln!("L1: AppArmor {name} started in {:?}", case.elapsed());
        let log = Path::new(&pc.log_directory).join(format!("{name}.log"));
        assert!(
            eventually(Duration::from_secs(20), || async {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains(want)
            })
            .await,
            "{name}: the container's /proc/self/attr/current is not {want:?}: {:?}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        // Exec'd processes run under the container's profile too; isola-default denies
        // mount even with CAP_SYS_ADMIN (unconfined allows it); the test's Localhost
        // profile denies reading /etc/hostname.
        let r = exec(&mut rt, &id, &["sh", "-c", probe], 20)
            .await
            .expect("ExecSync");
        let out = String::from_utf8_lossy(&r.stdout).to_string();
        let lines: Vec<&str> = out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.first().copied(), Some(want), "{name}: exec {out:?}");
        // Neither isola-default nor the test profile allows mount.
        let mount = if want == "unconfined" {
            "mounted"
        } else {
            "mount-refused"
        };
        assert_eq!(lines.get(1).copied(), Some(mount), "{name}: {out:?}");
        let hostname = if name == "local" {
            "hostname-denied"
        } else {
            "hostname-read"
        };
        assert_eq!(lines.get(2).copied(), Some(hostname), "{name}: {out:?}");
        eprintln!("L1: AppArmor {name} done in {:?}", case.elapsed());
    }
    // The deprecated string form.
    let mut c = w.sh("legacy", attr);
    #[allow(deprecated)]
    let sc = cri::LinuxContainerSecurityContext {
        apparmor_profile: "localhost/isola-test-localhost".into(),
        ..Default::default()
    };
    c.linux = Some(cri::LinuxContainerConfig {
        resources: None,
        security_context: Some(sc),
    });
    let id = run(&mut rt, &pod, &pc, c).await;
    let r = exec(&mut rt, &id, &["cat", "/proc/self/attr/current"], 10)
        .await
        .expect("ExecSync");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        "isola-test-localhost (enforce)"
    );

    // A profile that is not loaded.
    let mut c = w.sh("missing", attr);
    c.linux = Some(cri::LinuxContainerConfig {
        resources: None,
        security_context: Some(cri::LinuxContainerSecurityContext {
            apparmor: apparmor(ProfileType::Localhost, "no-such-profile"),
            ..Default::default()
        }),
    });
    let err = isola_tests::fixtures::create(&mut rt, &pod, &pc, c)
        .await
        .expect_err("a profile that is not loaded");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("no-such-profile"), "{err:?}");
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
}

/// `cgroup_driver = "systemd"` where systemd does not manage the cgroups (this host:
/// no systemd as PID 1, cgroup v1): isola makes each scope's cgroup itself at the path
/// systemd would give it (libcontainer cannot start scopes there), with its limits; the
/// pod's cgroups are gone after Stop/Remove. Where systemd does manage them, the scope
/// is a real unit (as in L1).
#[tokio::test]
async fn systemd_driver_where_systemd_does_not_manage_cgroups() {
    let w = World::start_lean("cgroup_driver = \"systemd\"").await;
    let mut rt = w.rt().await;
    let slice = format!("isolatest-pod{}.slice", std::process::id());
    let pc = pod_with_parent(&w, "nosd", &slice);
    let pod = run_pod(&mut rt, pc.clone(), "")
        .await
        .expect("RunPodSandbox");
    let mut c = w.sh("app", "sleep 600");
    c.linux = Some(limits(64 << 20, 0));
    let id = run(&mut rt, &pod, &pc, c).await;
    let cgroup = format!("/isolatest.slice/{slice}/isola-{id}.scope");
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let limit = if v2 {
        cg_file(&cgroup, "memory.max")
    } else {
        cg_file(&format!("memory{cgroup}"), "memory.limit_in_bytes")
    };
    assert_eq!(limit, (64u64 << 20).to_string(), "{cgroup}");
    let r = exec(&mut rt, &id, &["echo", "hi"], 10)
        .await
        .expect("ExecSync");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "hi\n");
    let s = stats_of(&mut rt, &id).await;
    assert!(working_set(&s) > 0, "{s:?}");
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
    let dir = if v2 {
        format!("/sys/fs/cgroup{cgroup}")
    } else {
        format!("/sys/fs/cgroup/memory{cgroup}")
    };
    assert!(!Path::new(&dir).exists(), "{dir} left");
    // The slices above it are kubelet's (or systemd's) to remove; here, the test's.
    let hierarchies: Vec<std::path::PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    for d in [
        format!("isolatest.slice/{slice}"),
        "isolatest.slice".to_string(),
    ] {
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&d));
        for h in &hierarchies {
            let _ = std::fs::remove_dir(h.join(&d));
        }
    }
}
