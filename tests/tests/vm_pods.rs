//! VM pods through the CRI socket: what only a pod in its own microVM has — its own
//! kernel and size, host processes out of sight, refusal of host namespaces and devices,
//! side-by-side traffic with native pods, and what happens when the VM or its shim dies.
//! (The end-to-end tests of native pods, networking and streaming also run for the vm
//! handler: see `for_each_handler!` in those files.)

use std::time::Duration;

use isola_proto::cri;
use isola_tests::fixtures::*;
use isola_tests::*;
use nix::sys::signal::Signal;
use tonic::Code;

const EXITED: i32 = cri::ContainerState::ContainerExited as i32;
const NOTREADY: i32 = cri::PodSandboxState::SandboxNotready as i32;

/// The pod's details from its verbose status (the shim's info: hypervisor, host pids...).
async fn details(rt: &mut Runtime, pod: &str) -> serde_json::Value {
    let st = pod_status(rt, pod, true).await.expect("status");
    let info: serde_json::Value =
        serde_json::from_str(st.info.get("info").expect("verbose info")).expect("json");
    info["details"].clone()
}

async fn sh_out(rt: &mut Runtime, id: &str, script: &str) -> String {
    let r = exec(rt, id, &["sh", "-c", script], 30).await.expect("exec");
    assert_eq!(
        r.exit_code,
        0,
        "{script}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).trim().to_string()
}

/// After refused RunPodSandbox calls: nothing was recorded.
async fn assert_no_pods(rt: &mut Runtime) {
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .expect("list")
        .into_inner();
    assert!(pods.items.is_empty(), "a refused pod was recorded");
}

/// The VMM's host pid from the pod's details.
fn vmm_pid(d: &serde_json::Value) -> i32 {
    d["vmmPid"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no vmmPid in {d}"))
}

fn host_pids(d: &serde_json::Value) -> Vec<u32> {
    d["hostPids"]
        .as_str()
        .unwrap_or_default()
        .split(',')
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[tokio::test]
async fn a_vm_pod_has_its_own_kernel_size_and_process_table() {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let mut pc = w.pod("iso");
    // 2 vCPUs worth of limits and 128 MiB on top of the class's 1 vCPU / 256 MiB.
    let parent = format!("/isola-test-vm-{}", std::process::id());
    pc.linux = Some(cri::LinuxPodSandboxConfig {
        cgroup_parent: parent.clone(),
        resources: Some(cri::LinuxContainerResources {
            cpu_quota: 100_000,
            cpu_period: 100_000,
            memory_limit_in_bytes: 128 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod = run_pod(&mut rt, pc.clone(), "vm").await.expect("vm pod");
    let d = details(&mut rt, &pod).await;
    let id = run(&mut rt, &pod, &pc, w.sh("c", "sleep 3600")).await;

    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("uname");
    let guest_kernel = sh_out(&mut rt, &id, "uname -r").await;
    assert_ne!(
        guest_kernel,
        host_kernel.trim(),
        "the pod runs on the host's kernel"
    );
    assert_eq!(
        d["guestKernel"].as_str(),
        Some(guest_kernel.as_str()),
        "{d}"
    );

    // The VM's size, not the host's: 384 MiB of memory, 2 CPUs (the host has 2 too, so
    // compare with what the shim booted).
    let mem_kib: u64 = sh_out(
        &mut rt,
        &id,
        "grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2",
    )
    .await
    .parse()
    .expect("MemTotal");
    let host_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .expect("meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("host MemTotal");
    assert!(
        (300 << 10..=384 << 10).contains(&mem_kib),
        "guest MemTotal {mem_kib} KiB, expected about 384 MiB (host {host_kib} KiB)"
    );
    let nproc = sh_out(&mut rt, &id, "grep -c ^processor /proc/cpuinfo").await;
    assert_eq!(nproc, "2");
    assert_eq!(d["vcpus"].as_str(), Some("2"), "{d}");

    // The host's processes and files are out of sight.
    let me = std::process::id();
    let r = exec(
        &mut rt,
        &id,
        &[
            "sh",
            "-c",
            &format!("test -e /proc/{me}/cmdline && cat /proc/{me}/cmdline"),
        ],
        10,
    )
    .await
    .expect("exec");
    let seen = String::from_utf8_lossy(&r.stdout);
    assert!(
        !seen.contains("vm_pods"),
        "the test process is visible in the pod: {seen}"
    );
    let procs: usize = sh_out(&mut rt, &id, "ls -d /proc/[0-9]* | wc -l")
        .await
        .parse()
        .expect("count");
    assert!(procs < 10, "{procs} processes visible in the pod");
    let marker = w.agent.dir().join("host-only-file");
    std::fs::write(&marker, "secret").expect("marker");
    let r = exec(&mut rt, &id, &["cat", &marker.display().to_string()], 10)
        .await
        .expect("exec");
    assert_ne!(r.exit_code, 0, "a host file is readable from the vm pod");
    // The VMM and its helpers run on the host; the shim recorded them.
    let pids = host_pids(&d);
    assert!(!pids.is_empty() && pids.iter().all(|p| alive(*p)), "{d}");
    // ...in kubelet's pod cgroup, where the RuntimeClass overhead is accounted.
    let procs_file = ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"]
        .iter()
        .map(|r| {
            std::path::Path::new(r)
                .join(parent.trim_start_matches('/'))
                .join("cgroup.procs")
        })
        .find(|p| p.exists())
        .expect("the pod cgroup on the host");
    let procs = std::fs::read_to_string(&procs_file).expect("cgroup.procs");
    for p in &pids {
        assert!(
            procs.lines().any(|l| l == p.to_string()),
            "pid {p} not in {}: {procs}",
            procs_file.display()
        );
    }
    teardown(&mut rt, &pod).await;
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "VM processes outlived the pod"
    );
    w.agent.assert_no_leaks();
    for h in [
        "memory",
        "pids",
        "cpu,cpuacct",
        "blkio",
        "devices",
        "freezer",
        "net_cls,net_prio",
        "perf_event",
        "hugetlb",
        "cpuset",
        "",
    ] {
        let _ = std::fs::remove_dir(
            std::path::Path::new("/sys/fs/cgroup")
                .join(h)
                .join(parent.trim_start_matches('/')),
        );
    }
}

/// The VMM's resident guest memory in KiB (QEMU's memory backend is a shared memfd:
/// RssShmem in /proc/<pid>/status).
fn vmm_guest_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("vmm status")
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("RssShmem")
}

#[tokio::test]
async fn memory_the_guest_frees_goes_back_to_the_host() {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("balloon");
    let pod = run_pod(&mut rt, pc.clone(), "vm").await.expect("vm pod");
    let d = details(&mut rt, &pod).await;
    let id = run(&mut rt, &pod, &pc, w.sh("c", "sleep 3600")).await;
    let qemu = host_pids(&d)
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with("qemu"))
        })
        .unwrap_or_else(|| panic!("no QEMU among the pod's host pids: {d}"));
    // The guest reports every free page (isola-guest sets the order).
    let order = sh_out(
        &mut rt,
        &id,
        "cat /sys/module/page_reporting/parameters/page_reporting_order",
    )
    .await;
    assert_eq!(order, "0", "guest page reporting order");
    // Page-sized percpu units (percpu_alloc=page): with the default 2 MiB units the
    // guest's one dynamic percpu chunk brings a 4 MiB vmalloc'ed memcg array.
    let vmalloc_kib: u64 = sh_out(
        &mut rt,
        &id,
        "awk '/^VmallocUsed:/ {print $2}' /proc/meminfo",
    )
    .await
    .parse()
    .expect("VmallocUsed in the guest's /proc/meminfo");
    assert!(
        vmalloc_kib < 2048,
        "the guest's vmalloc area holds {vmalloc_kib} KiB (4 MiB of it a percpu chunk's memcg \
         array unless the kernel runs with percpu_alloc=page)"
    );

    // The guest shim runs from the share, not from the initramfs's tmpfs (8 MiB of
    // shmem when it did), and /init is gone once it handed over.
    let shmem_kib: u64 = sh_out(&mut rt, &id, "awk '/^Shmem:/ {print $2}' /proc/meminfo")
        .await
        .parse()
        .expect("Shmem in the guest's /proc/meminfo");
    assert!(
        shmem_kib < 1024,
        "the guest holds {shmem_kib} KiB of tmpfs before anything wrote to one"
    );
    // 48 MiB into the pod's /dev/shm (a tmpfs in guest memory): the host backs it...
    let before = vmm_guest_kib(qemu);
    sh_out(&mut rt, &id, "head -c 48m /dev/zero > /dev/shm/fill").await;
    let filled = vmm_guest_kib(qemu);
    assert!(
        filled >= before + (40 << 10),
        "guest memory on the host went from {before} to only {filled} KiB"
    );
    // ...and once the guest frees it, the host gets it back (reports run 2 s after).
    sh_out(&mut rt, &id, "rm /dev/shm/fill").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut now = vmm_guest_kib(qemu);
    while now > filled - (32 << 10) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        now = vmm_guest_kib(qemu);
    }
    assert!(
        now <= filled - (32 << 10),
        "the host still backs the freed guest memory: {before} KiB before, {filled} filled, \
         {now} a minute after the guest freed 48 MiB"
    );
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
}

#[tokio::test]
async fn a_vm_class_whose_guest_agent_is_missing_is_refused_cleanly() {
    // The class as shipped, with its guest agent (what /init hands the shim API to,
    // from the pod's virtio-fs share) somewhere it is not.
    let mut w = World::start().await;
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime-classes/vm.toml");
    let toml = std::fs::read_to_string(shipped).expect("runtime-classes/vm.toml");
    let agent_line = toml
        .lines()
        .find(|l| l.starts_with("agent = "))
        .expect("the vm class names its guest agent");
    let toml = toml
        .replace("handler = \"vm\"", "handler = \"vm-noagent\"")
        .replace(agent_line, "agent = \"/nonexistent/isola-guest\"");
    let classes = w.agent.dir().join("runtime-classes");
    std::fs::write(classes.join("vm-noagent.toml"), toml).expect("class file");
    // Classes are read at start.
    w.agent.signal_and_wait(Signal::SIGTERM);
    w.agent.restart().await;
    let mut rt = w.rt().await;
    let err = run_pod(&mut rt, w.pod("noagent"), "vm-noagent")
        .await
        .expect_err("a vm pod without its guest agent");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message()
            .contains("guest agent not found at /nonexistent/isola-guest"),
        "{}",
        err.message()
    );
    assert_no_pods(&mut rt).await;
    w.agent.assert_no_leaks();
}

#[tokio::test]
async fn host_namespaces_and_devices_are_refused_and_volumes_cross_into_the_vm() {
    let w = World::start().await;
    let mut rt = w.rt().await;
    for (what, ns) in [
        (
            "pid",
            cri::NamespaceOption {
                pid: cri::NamespaceMode::Node as i32,
                ..Default::default()
            },
        ),
        (
            "ipc",
            cri::NamespaceOption {
                ipc: cri::NamespaceMode::Node as i32,
                ..Default::default()
            },
        ),
    ] {
        let mut pc = w.pod(&format!("host{what}"));
        pc.linux = Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(ns),
                ..Default::default()
            }),
            ..Default::default()
        });
        let err = run_pod(&mut rt, pc, "vm")
            .await
            .expect_err("host namespace");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains(what), "{}", err.message());
    }
    assert_no_pods(&mut rt).await;

    let pc = w.pod("vol");
    let pod = run_pod(&mut rt, pc.clone(), "vm").await.expect("vm pod");
    // A host device cannot be passed into the guest.
    let mut dev = w.sh("dev", "true");
    dev.devices = vec![cri::Device {
        container_path: "/dev/x".into(),
        host_path: "/dev/null".into(),
        permissions: "rwm".into(),
    }];
    let err = create(&mut rt, &pod, &pc, dev).await.expect_err("device");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("/dev/null"), "{}", err.message());
    // Host directories, read-only and read-write, through the virtio-fs share.
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
            ..Default::default()
        },
    ];
    let id = run(&mut rt, &pod, &pc, c).await;
    assert_eq!(sh_out(&mut rt, &id, "cat /data/hello").await, "from-host");
    let r = exec(&mut rt, &id, &["sh", "-c", "touch /data/x"], 10)
        .await
        .expect("exec");
    assert_ne!(r.exit_code, 0, "a read-only volume was written");
    assert_eq!(
        sh_out(&mut rt, &id, "echo out > /out/f && echo ok").await,
        "ok"
    );
    assert_eq!(
        std::fs::read_to_string(rw.path().join("f"))
            .expect("written through")
            .trim(),
        "out"
    );
    // Writes to the container's rootfs stay in its own writable layer.
    let other = run(&mut rt, &pod, &pc, w.sh("o", "sleep 1000")).await;
    sh_out(&mut rt, &id, "echo mine > /etc/only-in-m").await;
    let r = exec(&mut rt, &other, &["cat", "/etc/only-in-m"], 10)
        .await
        .expect("exec");
    assert_ne!(
        r.exit_code, 0,
        "a rootfs write leaked into another container"
    );
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
}

/// A bridge and subnet of this test's own (10.99.60.0/24), removed at the end.
struct Bridge(&'static str);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", self.0])
            .status();
    }
}

#[tokio::test]
async fn native_and_vm_pods_talk_to_each_other() {
    let bridge = Bridge("isolat60");
    let _ = std::process::Command::new("ip")
        .args(["link", "del", bridge.0])
        .stderr(std::process::Stdio::null())
        .status();
    let ipam = tempfile::tempdir().expect("ipam");
    let w = World::start().await;
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "isola-test-60",
        "plugins": [
            {"type": "bridge", "bridge": bridge.0, "isGateway": true, "ipMasq": false,
             "hairpinMode": true,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.99.60.0/24"}]],
                      "dataDir": ipam.path()}},
            {"type": "loopback"}
        ]
    });
    std::fs::write(
        w.agent.cni_conf_dir().join("10-test.conflist"),
        conf.to_string(),
    )
    .expect("conflist");
    let mut rt = w.rt().await;
    let server = "mkdir -p /tmp/www && echo hello-$(uname -r) > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www";
    let pn = w.pod("nat");
    let native = run_pod(&mut rt, pn.clone(), "").await.expect("native pod");
    let pv = w.pod("vmp");
    let vm = run_pod(&mut rt, pv.clone(), "vm").await.expect("vm pod");
    let ip = |st: cri::PodSandboxStatusResponse| {
        st.status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default()
    };
    let ip_n = ip(pod_status(&mut rt, &native, false).await.expect("status"));
    let ip_v = ip(pod_status(&mut rt, &vm, false).await.expect("status"));
    assert!(ip_v.starts_with("10.99.60."), "vm pod ip {ip_v:?}");
    let cn = run(&mut rt, &native, &pn, w.sh("srv", server)).await;
    let cv = run(&mut rt, &vm, &pv, w.sh("srv", server)).await;
    // The guest's eth0 holds the pod IP.
    let addr = sh_out(&mut rt, &cv, "ip -o -4 addr show eth0").await;
    assert!(addr.contains(&format!("{ip_v}/24")), "{addr}");
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("uname");
    let rt2 = rt.clone();
    let get = |from: String, ip: String| {
        let mut rt = rt2.clone();
        async move {
            let mut last = String::new();
            for _ in 0..60 {
                // Not wget alone: run as the exec's own process in a vm pod towards a
                // native pod, Debian's static busybox wget segfaults (a NULL write, in
                // the guest's dmesg) for some command lines and not others; run by sh
                // with a command after it, it works. The traffic is what this test is
                // about; the crash is noted in the issue.
                let script = format!("wget -q -O - http://{ip}:8080/ 2>&1; echo rc=$?");
                let r = exec(&mut rt, &from, &["sh", "-c", &script], 10).await;
                if let Ok(r) = &r {
                    let out = String::from_utf8_lossy(&r.stdout).trim().to_string();
                    if let Some(body) = out.strip_suffix("rc=0") {
                        return body.trim().to_string();
                    }
                }
                last = format!("{r:?}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            panic!("no answer from {ip}: {last}");
        }
    };
    // vm → native: the native pod answers with the host's kernel release.
    assert_eq!(
        get(cv.clone(), ip_n.clone()).await,
        format!("hello-{}", host_kernel.trim())
    );
    // native → vm: the vm pod answers with the guest's.
    let guest = sh_out(&mut rt, &cv, "uname -r").await;
    assert_eq!(
        get(cn.clone(), ip_v.clone()).await,
        format!("hello-{guest}")
    );
    // And the host reaches the vm pod's IP (the bridge is the gateway).
    let mut body = String::new();
    let ok = eventually(Duration::from_secs(20), || {
        let r = std::net::TcpStream::connect_timeout(
            &format!("{ip_v}:8080").parse().expect("addr"),
            Duration::from_secs(2),
        )
        .and_then(|mut s| {
            use std::io::{Read, Write};
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        });
        let ok = r.as_ref().is_ok_and(|b| b.contains(&guest));
        body = format!("{r:?}");
        async move { ok }
    })
    .await;
    assert!(ok, "the host did not reach the vm pod at {ip_v}: {body}");
    teardown(&mut rt, &vm).await;
    teardown(&mut rt, &native).await;
    // No TAP or veth left on the test's bridge.
    let ports: Vec<_> = std::fs::read_dir(format!("/sys/class/net/{}/brif", bridge.0))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(ports.is_empty(), "{ports:?}");
    w.agent.assert_no_leaks();
}

#[tokio::test]
async fn a_dead_vm_makes_the_pod_notready_and_its_containers_exited() {
    let mut w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("dies");
    let pod = run_pod(&mut rt, pc.clone(), "vm").await.expect("vm pod");
    let id = run(&mut rt, &pod, &pc, w.sh("c", "sleep 3600")).await;
    let d = details(&mut rt, &pod).await;
    let vmm = vmm_pid(&d);
    let shim = shim_pid(&mut rt, &pod).await.expect("shim pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(vmm), Signal::SIGKILL).expect("kill vmm");
    assert!(
        eventually(Duration::from_secs(20), || {
            let mut rt = rt.clone();
            let pod = pod.clone();
            async move {
                pod_status(&mut rt, &pod, false)
                    .await
                    .ok()
                    .and_then(|s| s.status)
                    .map(|s| s.state)
                    == Some(NOTREADY)
            }
        })
        .await,
        "the pod stayed ready after its VM died"
    );
    let st = wait_exit(&mut rt, &id, Duration::from_secs(20)).await;
    assert_eq!(st.state, EXITED);
    assert_eq!(st.reason, "VMExited", "{st:?}");
    assert!(st.finished_at > 0);
    // The shim stays to tell the story, and stop/remove clean everything up.
    assert!(alive(shim), "the shim died with its VM");
    let err = exec(&mut rt, &id, &["true"], 5)
        .await
        .expect_err("exec in a dead VM");
    assert!(
        matches!(err.code(), Code::FailedPrecondition | Code::Unavailable),
        "{err:?}"
    );
    teardown(&mut rt, &pod).await;

    // The same while isolad is down: after its restart the pod is NOTREADY and the
    // container EXITED with the VM's reason.
    let pc = w.pod("dies-later");
    let pod = run_pod(&mut rt, pc.clone(), "vm").await.expect("vm pod");
    let id = run(&mut rt, &pod, &pc, w.sh("c", "sleep 3600")).await;
    let d = details(&mut rt, &pod).await;
    let vmm = vmm_pid(&d);
    w.agent.kill9();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(vmm), Signal::SIGKILL).expect("kill vmm");
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.agent.restart().await;
    let mut rt = w.rt().await;
    let st = pod_status(&mut rt, &pod, false)
        .await
        .expect("status")
        .status
        .expect("body");
    assert_eq!(st.state, NOTREADY, "{st:?}");
    let st = wait_exit(&mut rt, &id, Duration::from_secs(20)).await;
    assert_eq!(st.reason, "VMExited", "{st:?}");
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
}
