//! Boot benchmark of the hypervisor layer: N boots per guest kernel through the QEMU
//! backend, printing launch → first serial line, launch → agent hello (median, p90) and
//! host memory per VM after boot.
//!
//! Usage: isola-vm-bootbench [--boots N] [--memory-mib M] [--kernel P] [--initramfs P]
//!        [--bzimage P] [--cloud-kernel P --cloud-initramfs P] [--no-virtiofs]
//!
//! Without --cloud-* it compares with /usr/share/isola/guest/cloud/{vmlinuz,initramfs.cpio}
//! when deploy/guest/build-cloud-initramfs.sh has made them.
//!
//! The cloud kernel (Debian's linux-image-cloud-amd64) has its virtio drivers as modules
//! and finds virtio-mmio devices only through ACPI: it boots with `-M microvm,acpi=on`
//! and an initramfs that carries the modules (see deploy/guest/build-cloud-initramfs.sh).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use isola_vm::memory::ProcessMemory;
use isola_vm::qemu::QemuVm;
use isola_vm::select::{select, HostVirt, HypervisorChoice};
use isola_vm::{Device, Hypervisor, VmConfig};

struct Case {
    name: String,
    kernel: PathBuf,
    initramfs: PathBuf,
    acpi: bool,
}

#[derive(Default)]
struct Sample {
    first_line: Option<Duration>,
    hello: Duration,
    down: Duration,
    vmm_anon_kib: u64,
    vmm_file_kib: u64,
    guest_kib: u64,
    helpers_anon_kib: u64,
    helpers_file_kib: u64,
}

fn main() -> anyhow::Result<()> {
    let mut boots = 20usize;
    let mut memory_mib = 256u32;
    let mut virtiofs = true;
    let mut kernel = isola_vm::assets::guest_kernel();
    let mut initramfs = isola_vm::assets::guest_initramfs();
    let mut bzimage: Option<PathBuf> = None;
    let mut cloud_kernel: Option<PathBuf> = None;
    let mut cloud_initramfs: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--boots" => boots = value()?.parse()?,
            "--memory-mib" => memory_mib = value()?.parse()?,
            "--kernel" => kernel = value()?.into(),
            "--initramfs" => initramfs = value()?.into(),
            "--bzimage" => bzimage = Some(value()?.into()),
            "--cloud-kernel" => cloud_kernel = Some(value()?.into()),
            "--cloud-initramfs" => cloud_initramfs = Some(value()?.into()),
            "--no-virtiofs" => virtiofs = false,
            other => bail!("unknown argument {other}"),
        }
    }
    let mut cases = vec![Case {
        name: "isola 6.1 (PVH vmlinux)".into(),
        kernel,
        initramfs: initramfs.clone(),
        acpi: false,
    }];
    if let Some(bz) = bzimage {
        cases.push(Case {
            name: "isola 6.1 (bzImage)".into(),
            kernel: bz,
            initramfs: initramfs.clone(),
            acpi: false,
        });
    }
    // Debian's cloud kernel is compared by default when build-cloud-initramfs.sh ran.
    let cloud_dir = Path::new(isola_vm::assets::DEFAULT_GUEST_DIR).join("cloud");
    if cloud_kernel.is_none() && cloud_initramfs.is_none() {
        let (k, i) = (cloud_dir.join("vmlinuz"), cloud_dir.join("initramfs.cpio"));
        if k.is_file() && i.is_file() {
            cloud_kernel = Some(k);
            cloud_initramfs = Some(i);
        } else {
            println!(
                "note: no Debian cloud kernel in {} (deploy/guest/build-cloud-initramfs.sh makes it): not compared",
                cloud_dir.display()
            );
        }
    }
    match (cloud_kernel, cloud_initramfs) {
        (Some(k), Some(i)) => cases.push(Case {
            name: "debian cloud (acpi, modules)".into(),
            kernel: k,
            initramfs: i,
            acpi: true,
        }),
        (None, None) => {}
        _ => bail!("--cloud-kernel and --cloud-initramfs go together"),
    }
    let selection = select(HypervisorChoice::Qemu, HostVirt::detect())?;
    println!("backend: {} ({})", selection.backend, selection.reason);
    println!(
        "{boots} boots per kernel, {memory_mib} MiB guest, 1 vCPU, devices: console, agent port{}",
        if virtiofs {
            ", virtio-fs (virtiofsd)"
        } else {
            ""
        }
    );
    println!();
    println!(
        "{:<30} {:>17} {:>17} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "kernel",
        "1st line med/p90",
        "hello med/p90",
        "down med",
        "vmm anon",
        "vmm file",
        "guest",
        "fsd",
        "per-VM",
        "RSS sum"
    );
    for case in &cases {
        let mut samples = Vec::new();
        for i in 0..boots {
            let s = boot_once(case, &selection, memory_mib, virtiofs)
                .with_context(|| format!("{}: boot {i}", case.name))?;
            samples.push(s);
        }
        report(case, &samples);
    }
    println!();
    println!("1st line: launch of QEMU → first complete line on the serial console (kernel `quiet`: usually isola-guest's start line).");
    println!("hello: launch → the guest agent's answer to Hello on the agent port. down: shutdown request → QEMU exited.");
    println!("Memory in MiB after hello, medians: vmm anon/file: QEMU's RssAnon and RssFile (binary, libraries and the");
    println!("mapped kernel: page cache shared by all VMs); guest: guest RAM pages touched (QEMU's RssShmem of the memfd");
    println!("RAM backend); fsd: virtiofsd's RssAnon; per-VM: vmm anon + guest + fsd, what each more VM costs;");
    println!("RSS sum: every RSS figure of the VM's processes added up (shared pages counted).");
    Ok(())
}

fn boot_once(
    case: &Case,
    selection: &isola_vm::Selection,
    memory_mib: u32,
    virtiofs: bool,
) -> anyhow::Result<Sample> {
    let dir = std::env::temp_dir().join(format!("isola-bootbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let share = dir.join("share");
    std::fs::create_dir_all(&share)?;
    let run = dir.join("run");
    let mut config = VmConfig::new("bench", &case.kernel, &case.initramfs, &run);
    config.memory_mib = memory_mib;
    config.acpi = case.acpi;
    let mut vm = QemuVm::new(selection.clone(), config);
    if virtiofs {
        vm.add_device(Device::Fs {
            tag: "share".into(),
            shared_dir: share,
        })?;
    }
    let console = vm.console_log_path();
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || first_line_at(&console, &done))
    };
    vm.start()?;
    let launched = vm.launched_at().context("no launch time")?;
    let mut agent = vm.agent()?;
    agent.set_timeout(Duration::from_secs(60));
    agent.hello()?;
    let hello = launched.elapsed();
    let mut s = Sample {
        hello,
        ..Default::default()
    };
    let pids = vm.pids();
    if let Some(m) = pids.first().and_then(|p| ProcessMemory::of(*p)) {
        s.vmm_anon_kib = m.anon_kib;
        s.vmm_file_kib = m.file_kib;
        s.guest_kib = m.shmem_kib;
    }
    for p in pids.iter().skip(1) {
        if let Some(m) = ProcessMemory::of(*p) {
            // virtiofsd maps guest memory too; count only its own pages.
            s.helpers_anon_kib += m.anon_kib;
            s.helpers_file_kib += m.file_kib;
        }
    }
    done.store(true, Ordering::Relaxed);
    s.first_line = watcher
        .join()
        .ok()
        .flatten()
        .map(|t| t.saturating_duration_since(launched));
    let down = Instant::now();
    agent.shutdown()?;
    vm.wait(Some(Duration::from_secs(30)))?;
    s.down = down.elapsed();
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(s)
}

/// Polls the console log until it holds a full line; returns when it did.
fn first_line_at(path: &Path, done: &AtomicBool) -> Option<Instant> {
    let mut buf = Vec::new();
    loop {
        if let Ok(mut f) = std::fs::File::open(path) {
            buf.clear();
            if f.read_to_end(&mut buf).is_ok() && buf.contains(&b'\n') {
                return Some(Instant::now());
            }
        }
        if done.load(Ordering::Relaxed) {
            return None;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn report(case: &Case, samples: &[Sample]) {
    let mut first: Vec<Duration> = samples.iter().filter_map(|s| s.first_line).collect();
    first.sort();
    let mut hello: Vec<Duration> = samples.iter().map(|s| s.hello).collect();
    hello.sort();
    let mut down: Vec<Duration> = samples.iter().map(|s| s.down).collect();
    down.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mib = |k: u64| k as f64 / 1024.0;
    let med = |f: &dyn Fn(&Sample) -> u64| median_u64(samples.iter().map(f).collect());
    let vmm_anon = med(&|s| s.vmm_anon_kib);
    let vmm_file = med(&|s| s.vmm_file_kib);
    let guest = med(&|s| s.guest_kib);
    let fsd = med(&|s| s.helpers_anon_kib);
    let per_vm = med(&|s| s.vmm_anon_kib + s.guest_kib + s.helpers_anon_kib);
    let rss_sum = med(&|s| {
        s.vmm_anon_kib + s.vmm_file_kib + s.guest_kib + s.helpers_anon_kib + s.helpers_file_kib
    });
    println!(
        "{:<30} {:>7.0}/{:>6.0} ms {:>7.0}/{:>6.0} ms {:>6.0} ms {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
        case.name,
        ms(percentile(&first, 0.5)),
        ms(percentile(&first, 0.9)),
        ms(percentile(&hello, 0.5)),
        ms(percentile(&hello, 0.9)),
        ms(percentile(&down, 0.5)),
        mib(vmm_anon),
        mib(vmm_file),
        mib(guest),
        mib(fsd),
        mib(per_vm),
        mib(rss_sum),
    );
}
