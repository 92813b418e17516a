//! `isola-vmm-bench`: boots the same guest N times with isola-vmm and with QEMU (microvm,
//! KVM), measuring launch → the guest agent's hello, and each VMM's memory after hello.
//! Memory is split into the guest RAM's resident pages and the rest (the VMM's own
//! overhead). Built to run where /dev/kvm runs Linux: on hardware KVM, or inside the nested rig
//! (`cargo test --release -p isola-vmm --test nested -- --ignored --nocapture`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use isola_vmm::selftest::Agent;

#[derive(Debug, Parser)]
#[command(name = "isola-vmm-bench")]
struct Args {
    /// Boots per VMM.
    #[arg(long, default_value_t = 5)]
    boots: usize,
    /// Guest kernel (PVH vmlinux).
    #[arg(long)]
    kernel: PathBuf,
    /// Guest initramfs.
    #[arg(long)]
    initramfs: PathBuf,
    /// isola-vmm binary.
    #[arg(long, default_value = "isola-vmm")]
    vmm: PathBuf,
    /// QEMU binary; none skips QEMU.
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u32,
    /// Scratch directory for sockets and logs.
    #[arg(long, default_value = "/tmp")]
    dir: PathBuf,
}

/// One boot's figures.
#[derive(Debug, Clone, Copy)]
struct Sample {
    hello_ms: f64,
    down_ms: f64,
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    shmem_kib: u64,
    /// Resident pages of the guest RAM mapping.
    guest_kib: u64,
}

fn status_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resident KiB of the mappings exactly `size_kib` large: the guest RAM (no other mapping
/// of the VMM has its size).
fn guest_resident(pid: u32, size_kib: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut total = 0;
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            in_guest = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                == Some(size_kib);
        } else if let Some(v) = line.strip_prefix("Rss:") {
            if in_guest {
                total += v
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

fn boot(
    mut child: Child,
    socket: &Path,
    launched: Instant,
    mem_mib: u32,
) -> anyhow::Result<Sample> {
    let result = (|| {
        let mut agent = Agent::connect(socket, Duration::from_secs(20))?;
        agent.set_timeout(Duration::from_secs(60))?;
        agent.hello()?;
        let hello = launched.elapsed();
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
        let guest = guest_resident(child.id(), u64::from(mem_mib) * 1024);
        let down_start = Instant::now();
        agent.shutdown()?;
        Ok::<_, anyhow::Error>((hello, status, guest, down_start))
    })();
    let (hello, status, guest_kib, down_start) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("VMM did not exit after shutdown");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    if !exit.success() {
        bail!("VMM exited with {exit}");
    }
    Ok(Sample {
        hello_ms: hello.as_secs_f64() * 1e3,
        down_ms: down_start.elapsed().as_secs_f64() * 1e3,
        rss_kib: status_field(&status, "VmRSS:"),
        anon_kib: status_field(&status, "RssAnon:"),
        file_kib: status_field(&status, "RssFile:"),
        shmem_kib: status_field(&status, "RssShmem:"),
        guest_kib,
    })
}

fn isola(args: &Args, i: usize) -> anyhow::Result<Sample> {
    let socket = args.dir.join(format!("bench-isola-{i}.sock"));
    let log = args.dir.join(format!("bench-isola-{i}.log"));
    let launched = Instant::now();
    let child = Command::new(&args.vmm)
        .arg("--kernel")
        .arg(&args.kernel)
        .arg("--initramfs")
        .arg(&args.initramfs)
        .arg("--mem-mib")
        .arg(args.mem_mib.to_string())
        .arg("--agent-socket")
        .arg(&socket)
        .arg("--serial-log")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {}", args.vmm.display()))?;
    boot(child, &socket, launched, args.mem_mib)
}

fn qemu(args: &Args, qemu: &Path, i: usize) -> anyhow::Result<Sample> {
    let socket = args.dir.join(format!("bench-qemu-{i}.sock"));
    let log = args.dir.join(format!("bench-qemu-{i}.log"));
    let _ = std::fs::remove_file(&socket);
    let launched = Instant::now();
    // As the QEMU backend runs it (shims/vm/src/qemu.rs), less the memfd RAM backend
    // (only virtio-fs needs it; isola-vmm runs without one here too) and with QEMU
    // listening on the agent socket so that the same client connects to both.
    let child = Command::new(qemu)
        .args([
            "-M",
            "microvm,acpi=off,rtc=on",
            "-accel",
            "kvm",
            "-cpu",
            "host",
        ])
        .args(["-smp", "1", "-m"])
        .arg(format!("{}M", args.mem_mib))
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&args.kernel)
        .arg("-initrd")
        .arg(&args.initramfs)
        .args(["-append", isola_vmm::config::DEFAULT_CMDLINE])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .args(["-device", "virtio-serial-device,max_ports=2", "-chardev"])
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            socket.display()
        ))
        .args(["-device", "virtserialport,chardev=agent,name=isola.agent"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {}", qemu.display()))?;
    boot(child, &socket, launched, args.mem_mib)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

fn report(name: &str, samples: &[Sample]) {
    // Each boot too, in order: the nested rig's spread hides in a median.
    let each: Vec<String> = samples
        .iter()
        .map(|s| format!("{:.0}", s.hello_ms))
        .collect();
    println!("bench: {name:<10} hello per boot (ms): {}", each.join(" "));
    let mut hello: Vec<f64> = samples.iter().map(|s| s.hello_ms).collect();
    let mut down: Vec<f64> = samples.iter().map(|s| s.down_ms).collect();
    let med = |f: fn(&Sample) -> u64| {
        let mut v: Vec<f64> = samples.iter().map(|s| f(s) as f64 / 1024.0).collect();
        percentile(&mut v, 0.5)
    };
    println!(
        "bench: {name:<10} boots={:<3} hello min/med/p90 = {:>6.0}/{:>6.0}/{:>6.0} ms  down med {:>5.0} ms  \
         rss {:>6.1} MiB = guest {:>5.1} + vmm {:>5.1} (anon {:>5.1}, file {:>5.1}, shmem {:>5.1})",
        samples.len(),
        percentile(&mut hello.clone(), 0.0),
        percentile(&mut hello.clone(), 0.5),
        percentile(&mut hello, 0.9),
        percentile(&mut down, 0.5),
        med(|s| s.rss_kib),
        med(|s| s.guest_kib),
        med(|s| s.rss_kib.saturating_sub(s.guest_kib)),
        med(|s| s.anon_kib),
        med(|s| s.file_kib),
        med(|s| s.shmem_kib),
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut isola_samples = Vec::new();
    let mut qemu_samples = Vec::new();
    // Interleaved, so that drifting machine load hits both alike.
    for i in 0..args.boots {
        isola_samples.push(isola(&args, i).with_context(|| format!("isola-vmm boot {i}"))?);
        if let Some(q) = &args.qemu {
            qemu_samples.push(qemu(&args, q, i).with_context(|| format!("qemu boot {i}"))?);
        }
    }
    report("isola-vmm", &isola_samples);
    if !qemu_samples.is_empty() {
        report("qemu", &qemu_samples);
    }
    Ok(())
}
