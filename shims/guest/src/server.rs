//! The guest API served over the agent port: one request at a time, in order.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use isola_proto::guest::{
    request, response, BootTimes, ConfigureInterfaceRequest, ConfigureInterfaceResponse, Error,
    ExecRequest, ExecResponse, HelloResponse, MountRequest, MountResponse, ReadFileRequest,
    ReadFileResponse, Request, Response, ServeShimRequest, ServeShimResponse, ShutdownResponse,
    WriteFileRequest, WriteFileResponse,
};

use crate::clock::{self, Stamp};
use crate::frame::{read_frame, write_frame, FrameError};

/// Boot facts gathered by init for the hello.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// Clocks when init started.
    pub start: Stamp,
    /// Clocks when the agent port was open.
    pub ready: Stamp,
    /// /proc/uptime at init start, in ms.
    pub uptime_ms: u64,
}

/// Errors that end the serving loop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Writing a response failed for good.
    #[error("writing a response: {0}")]
    Write(std::io::Error),
}

/// What a handled request asks the loop to do next.
enum Next {
    Continue,
    PowerOff,
    ServeShim(ServeShimRequest, Option<File>),
}

/// How the framed conversation ended.
#[derive(Debug)]
pub enum Ended {
    /// The host asked for a power-off.
    PowerOff,
    /// The host asked for the shim API on the same port (see `ServeShimRequest`), served
    /// by the program opened here (its `program`), or by this binary itself if none.
    ServeShim(File, ServeShimRequest, Option<File>),
}

/// The guest API server.
#[derive(Debug)]
pub struct Server {
    boot: BootInfo,
}

/// How long to wait before reading again while the host side is not connected (a read
/// on an unconnected virtio-console port returns end-of-file at once).
const HOST_ABSENT_POLL: Duration = Duration::from_millis(10);

impl Server {
    /// A server reporting `boot` in its hello.
    pub fn new(boot: BootInfo) -> Self {
        Self { boot }
    }

    /// Serves requests on `port` until a shutdown or serve-shim request.
    pub fn serve(&self, mut port: File) -> Result<Ended, ServeError> {
        loop {
            reap_orphans();
            let req: Request = match read_frame(&mut port) {
                Ok(Some(req)) => req,
                Ok(None) | Err(FrameError::Io(_)) => {
                    // Host not connected, or it went away mid-frame: wait for it.
                    std::thread::sleep(HOST_ABSENT_POLL);
                    continue;
                }
                Err(e @ FrameError::Decode(_)) | Err(e @ FrameError::TooLarge(_)) => {
                    let resp = error_response(0, e.to_string());
                    write_frame(&mut port, &resp).map_err(ServeError::Write)?;
                    continue;
                }
            };
            let id = req.id;
            let (resp, next) = match req.kind {
                Some(kind) => self.handle(id, kind),
                None => (
                    error_response(id, "request without a kind".into()),
                    Next::Continue,
                ),
            };
            write_frame(&mut port, &resp).map_err(ServeError::Write)?;
            match next {
                Next::Continue => {}
                Next::PowerOff => return Ok(Ended::PowerOff),
                Next::ServeShim(r, program) => return Ok(Ended::ServeShim(port, r, program)),
            }
        }
    }

    fn handle(&self, id: u64, kind: request::Kind) -> (Response, Next) {
        let result = match kind {
            request::Kind::Hello(_) => Ok(response::Kind::Hello(self.hello())),
            request::Kind::Shutdown(_) => {
                let resp = Response {
                    id,
                    kind: Some(response::Kind::Shutdown(ShutdownResponse {})),
                };
                return (resp, Next::PowerOff);
            }
            request::Kind::ServeShim(r) => {
                let program = if r.program.is_empty() {
                    if !cfg!(feature = "shim") {
                        let msg = "this isola-guest was built without its shim: \
                                   ServeShim needs a program";
                        return (error_response(id, msg.into()), Next::Continue);
                    }
                    None
                } else {
                    match crate::handoff::open_program(&r.program) {
                        Ok(f) => Some(f),
                        Err(e) => return (error_response(id, e), Next::Continue),
                    }
                };
                let resp = Response {
                    id,
                    kind: Some(response::Kind::ServeShim(ServeShimResponse {})),
                };
                return (resp, Next::ServeShim(r, program));
            }
            request::Kind::Exec(r) => exec(r).map(response::Kind::Exec),
            request::Kind::Mount(r) => mount(r).map(response::Kind::Mount),
            request::Kind::ConfigureInterface(r) => {
                configure_interface(r).map(response::Kind::ConfigureInterface)
            }
            request::Kind::ReadFile(r) => read_file(r).map(response::Kind::ReadFile),
            request::Kind::WriteFile(r) => write_file(r).map(response::Kind::WriteFile),
        };
        let resp = match result {
            Ok(kind) => Response {
                id,
                kind: Some(kind),
            },
            Err(message) => error_response(id, message),
        };
        (resp, Next::Continue)
    }

    fn hello(&self) -> HelloResponse {
        // SAFETY: sysconf has no memory effects.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        HelloResponse {
            api_version: isola_proto::GUEST_API_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            cpus: u32::try_from(cpus).unwrap_or(0),
            memory_total_bytes: mem_total_bytes(),
            boot: Some(BootTimes {
                init_start_boottime_ns: self.boot.start.boottime_ns,
                channel_ready_boottime_ns: self.boot.ready.boottime_ns,
                init_start_monotonic_ns: self.boot.start.monotonic_ns,
                channel_ready_monotonic_ns: self.boot.ready.monotonic_ns,
                init_start_uptime_ms: self.boot.uptime_ms,
                hello_boottime_ns: clock::now_ns(libc::CLOCK_BOOTTIME),
            }),
        }
    }
}

/// As PID 1 we inherit every orphan: reap those that exited. Only called between
/// requests, when no exec child of ours is being waited for.
fn reap_orphans() {
    let mut status = 0;
    // SAFETY: waitpid writes only to `status`; WNOHANG keeps it from blocking.
    while unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } > 0 {}
}

fn error_response(id: u64, message: String) -> Response {
    Response {
        id,
        kind: Some(response::Kind::Error(Error { message })),
    }
}

fn mem_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

fn exec(r: ExecRequest) -> Result<ExecResponse, String> {
    let program = r.argv.first().ok_or("exec: empty argv")?;
    let mut cmd = Command::new(program);
    cmd.args(&r.argv[1..])
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if r.env.is_empty() {
        cmd.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    for kv in &r.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("exec: env entry {kv:?} lacks '='"))?;
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| format!("exec {program}: {e}"))?;
    let stdin = child.stdin.take();
    let data = r.stdin;
    let writer = std::thread::spawn(move || {
        if let Some(mut s) = stdin {
            let _ = s.write_all(&data);
        }
    });
    let readers = [
        child.stdout.take().map(drain),
        child.stderr.take().map(drain),
    ];
    let deadline =
        (r.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(r.timeout_ms.into()));
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("exec {program}: wait: {e}")),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = writer.join();
    let [stdout, stderr] = readers.map(|h| h.and_then(|h| h.join().ok()).unwrap_or_default());
    use std::os::unix::process::ExitStatusExt;
    Ok(ExecResponse {
        exit_code: status.code().unwrap_or(-1),
        signal: status.signal().unwrap_or(0),
        stdout,
        stderr,
    })
}

fn drain<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

fn mount(r: MountRequest) -> Result<MountResponse, String> {
    let flags = if r.readonly { libc::MS_RDONLY } else { 0 };
    crate::init::mount(&r.source, &r.target, &r.fstype, flags, &r.data)
        .map_err(|e| e.to_string())?;
    Ok(MountResponse {})
}

fn configure_interface(r: ConfigureInterfaceRequest) -> Result<ConfigureInterfaceResponse, String> {
    use crate::net;
    let name = r.name.as_str();
    if r.addresses.len() > 1 {
        return Err("configure_interface: one IPv4 address per interface for now".into());
    }
    if !r.mac.is_empty() {
        let mac = net::parse_mac(&r.mac).map_err(|e| e.to_string())?;
        net::set_mac(name, mac).map_err(|e| e.to_string())?;
    }
    if r.mtu > 0 {
        net::set_mtu(name, r.mtu).map_err(|e| e.to_string())?;
    }
    for a in &r.addresses {
        let addr: Ipv4Addr = a
            .address
            .parse()
            .map_err(|_| format!("configure_interface: invalid address {:?}", a.address))?;
        net::set_address(name, addr, a.prefix_len).map_err(|e| e.to_string())?;
    }
    net::set_up(name).map_err(|e| e.to_string())?;
    for route in &r.routes {
        let (dest, len) = net::parse_cidr(&route.destination).map_err(|e| e.to_string())?;
        let gateway =
            if route.gateway.is_empty() {
                None
            } else {
                Some(route.gateway.parse::<Ipv4Addr>().map_err(|_| {
                    format!("configure_interface: invalid gateway {:?}", route.gateway)
                })?)
            };
        net::add_route(name, dest, len, gateway).map_err(|e| e.to_string())?;
    }
    Ok(ConfigureInterfaceResponse {})
}

fn read_file(r: ReadFileRequest) -> Result<ReadFileResponse, String> {
    let max = if r.max_bytes == 0 {
        16 << 20
    } else {
        r.max_bytes
    };
    let file = File::open(&r.path).map_err(|e| format!("open {}: {e}", r.path))?;
    let mut data = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("read {}: {e}", r.path))?;
    if data.len() as u64 > max {
        return Err(format!("{} is larger than {max} bytes", r.path));
    }
    Ok(ReadFileResponse { data })
}

fn write_file(r: WriteFileRequest) -> Result<WriteFileResponse, String> {
    let mode = if r.mode == 0 { 0o644 } else { r.mode };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .append(r.append)
        .truncate(!r.append)
        .mode(mode)
        .open(&r.path)
        .map_err(|e| format!("open {}: {e}", r.path))?;
    file.write_all(&r.data)
        .map_err(|e| format!("write {}: {e}", r.path))?;
    Ok(WriteFileResponse {})
}
