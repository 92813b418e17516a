//! `isola-vmm`: boots one microVM from flags and exits when it ends (0 on guest poweroff;
//! 2 on a guest panic, 3 on a triple fault, 4 on a vCPU error, 1 on a set-up error, 5 when
//! the self-test fails).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use isola_vmm::config::{DiskConfig, FsConfig, NetBackend, NetConfig};
use isola_vmm::devices::virtio::net::{owned_fd, parse_mac};
use isola_vmm::selftest::{self, Checks};
use isola_vmm::{ExitReason, Vmm, VmmConfig};

#[derive(Debug, Parser)]
#[command(
    name = "isola-vmm",
    about = "isola's microVM monitor: boots one VM on KVM"
)]
struct Args {
    /// ELF vmlinux with a PVH entry note.
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs (cpio).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line (the VMM appends its virtio_mmio.device= words).
    #[arg(long, default_value = isola_vmm::config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u32,
    /// File receiving the serial console.
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Unix socket to listen on for the agent channel (virtio-console port isola.agent).
    #[arg(long)]
    agent_socket: Option<PathBuf>,
    /// virtio-net on the TAP of this name (created if missing); repeatable.
    #[arg(long)]
    tap: Vec<String>,
    /// virtio-net on an inherited TAP fd; repeatable.
    #[arg(long)]
    tap_fd: Vec<i32>,
    /// Guest MAC of the first network device.
    #[arg(long)]
    mac: Option<String>,
    /// virtio-blk on a raw image: PATH or PATH,ro; repeatable.
    #[arg(long)]
    blk: Vec<String>,
    /// virtio-fs on a running virtiofsd: TAG=SOCKET; repeatable.
    #[arg(long)]
    vhost_user_fs: Vec<String>,
    /// virtio-fs sharing a directory through a virtiofsd we start: TAG=DIR; repeatable.
    #[arg(long)]
    fs: Vec<String>,
    /// Run without the seccomp filters.
    #[arg(long)]
    no_seccomp: bool,
    /// Connect to the agent socket, run hello/exec (and the device checks asked for),
    /// then shut the guest down.
    #[arg(long)]
    selftest: bool,
    /// Self-test: mount /dev/vda (ext4) and expect hello.txt to hold this text.
    #[arg(long)]
    selftest_blk: Option<String>,
    /// Self-test: give the guest's eth0 this IPv4/prefix and ping it.
    #[arg(long)]
    selftest_net: Option<String>,
    /// Self-test: TAG=TEXT: mount the virtio-fs TAG and expect hello.txt to hold TEXT.
    #[arg(long)]
    selftest_fs: Option<String>,
}

fn config(args: &Args, helpers: &mut Vec<std::process::Child>) -> anyhow::Result<VmmConfig> {
    let mut c = VmmConfig::new(args.kernel.clone());
    c.initramfs = args.initramfs.clone();
    c.cmdline = args.cmdline.clone();
    c.vcpus = args.vcpus;
    c.mem_mib = args.mem_mib;
    c.serial_log = args.serial_log.clone();
    c.agent_socket = args.agent_socket.clone();
    c.seccomp = !args.no_seccomp;
    let mac = match &args.mac {
        Some(m) => Some(parse_mac(m).with_context(|| format!("bad --mac {m}"))?),
        None => None,
    };
    for name in &args.tap {
        c.nets.push(NetConfig {
            backend: NetBackend::TapName(name.clone()),
            mac: if c.nets.is_empty() { mac } else { None },
        });
    }
    for fd in &args.tap_fd {
        // SAFETY: the fd was handed to us on the command line by our parent, which keeps
        // no other use of it; nothing else in this process owns it.
        let owned = unsafe { owned_fd(*fd) };
        c.nets.push(NetConfig {
            backend: NetBackend::TapFd(owned),
            mac: if c.nets.is_empty() { mac } else { None },
        });
    }
    for spec in &args.blk {
        let (path, read_only) = match spec.strip_suffix(",ro") {
            Some(p) => (p, true),
            None => (spec.as_str(), false),
        };
        c.disks.push(DiskConfig {
            path: path.into(),
            read_only,
        });
    }
    for spec in &args.vhost_user_fs {
        let (tag, socket) = spec
            .split_once('=')
            .context("--vhost-user-fs wants TAG=SOCKET")?;
        c.shares.push(FsConfig {
            tag: tag.into(),
            socket: socket.into(),
        });
    }
    for (i, spec) in args.fs.iter().enumerate() {
        let (tag, dir) = spec.split_once('=').context("--fs wants TAG=DIR")?;
        let socket =
            std::env::temp_dir().join(format!("isola-vmm-{}-fs{i}.sock", std::process::id()));
        let child = isola_vmm::virtiofsd::spawn(&socket, Path::new(dir))
            .with_context(|| format!("virtio-fs share {tag}"))?;
        helpers.push(child);
        c.shares.push(FsConfig {
            tag: tag.into(),
            socket,
        });
    }
    Ok(c)
}

fn checks(args: &Args) -> anyhow::Result<Checks> {
    let mut checks = Checks {
        blk_expect: args.selftest_blk.clone(),
        ..Default::default()
    };
    if let Some(net) = &args.selftest_net {
        let (addr, prefix) = net
            .split_once('/')
            .context("--selftest-net wants ADDR/PREFIX")?;
        let addr: Ipv4Addr = addr.parse().context("--selftest-net address")?;
        let tap = args
            .tap
            .first()
            .context("--selftest-net needs a --tap NAME")?
            .clone();
        checks.net = Some((addr, prefix.parse().context("--selftest-net prefix")?, tap));
    }
    if let Some(fs) = &args.selftest_fs {
        let (tag, text) = fs.split_once('=').context("--selftest-fs wants TAG=TEXT")?;
        checks.fs = Some((tag.into(), text.into()));
    }
    Ok(checks)
}

fn main() {
    let launched = Instant::now();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ISOLA_VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let code = match run(&args, launched) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("isola-vmm: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(args: &Args, launched: Instant) -> anyhow::Result<i32> {
    let mut helpers = Vec::new();
    let config = config(args, &mut helpers)?;
    let checks = checks(args)?;
    if args.selftest && args.agent_socket.is_none() {
        bail!("--selftest needs --agent-socket");
    }
    let vmm = Vmm::build(config).context("building the VM")?;
    let selftest = if args.selftest {
        let socket = args.agent_socket.clone().unwrap_or_default();
        Some(std::thread::spawn(move || {
            let result = selftest::run(&socket, launched, &checks);
            if let Err(e) = &result {
                // The guest may be wedged: end the VM now rather than wait for it.
                println!("selftest: FAILED: {e}");
                std::process::exit(5);
            }
            result
        }))
    } else {
        None
    };
    let reason = vmm.run().context("running the VM")?;
    let vm_code = match &reason {
        ExitReason::Poweroff => 0,
        ExitReason::Panic(_) => 2,
        ExitReason::TripleFault => 3,
        ExitReason::VcpuError(_) => 4,
    };
    println!(
        "isola-vmm: {reason} after {} ms",
        launched.elapsed().as_millis()
    );
    if let Some(t) = selftest {
        match t.join() {
            Ok(Ok(())) => println!("selftest: passed"),
            Ok(Err(e)) => {
                println!("selftest: FAILED: {e}");
                return Ok(if vm_code == 0 { 5 } else { vm_code });
            }
            Err(_) => {
                println!("selftest: FAILED: panicked");
                return Ok(5);
            }
        }
    }
    Ok(vm_code)
}
