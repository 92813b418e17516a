//! A small client of the guest agent, for `isola-vmm --selftest`: where no host shim
//! exists (the nested test rig), the VMM checks its own guest: hello, exec, a disk, a
//! network interface, then shutdown.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use isola_proto::guest::{
    request, response, ConfigureInterfaceRequest, ExecRequest, HelloRequest, IpAddress,
    MountRequest, ReadFileRequest, Request, Response, ShutdownRequest,
};
use prost::Message;

/// Errors of the self-test.
#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    /// The channel failed.
    #[error("agent channel: {0}")]
    Io(#[from] std::io::Error),
    /// A message did not decode.
    #[error("undecodable answer: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The guest answered with an error or the wrong thing.
    #[error("{call}: {detail}")]
    Call {
        /// The call.
        call: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// A check failed.
    #[error("check failed: {0}")]
    Check(String),
}

/// The guest agent client (4-byte big-endian length, then one protobuf message).
#[derive(Debug)]
pub struct Agent {
    stream: UnixStream,
    next_id: u64,
}

impl Agent {
    /// Connects to the VMM's agent socket, retrying until `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, SelftestError> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(timeout))?;
                    return Ok(Self { stream, next_id: 1 });
                }
                Err(e) if Instant::now() >= deadline => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// Sets the per-call timeout.
    pub fn set_timeout(&mut self, t: Duration) -> Result<(), SelftestError> {
        Ok(self.stream.set_read_timeout(Some(t))?)
    }

    fn call(
        &mut self,
        call: &'static str,
        kind: request::Kind,
    ) -> Result<response::Kind, SelftestError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request {
            id,
            kind: Some(kind),
        };
        let mut buf = Vec::with_capacity(4 + req.encoded_len());
        buf.extend_from_slice(&(req.encoded_len() as u32).to_be_bytes());
        req.encode(&mut buf).map_err(|e| SelftestError::Call {
            call,
            detail: e.to_string(),
        })?;
        self.stream.write_all(&buf)?;
        loop {
            let mut len = [0u8; 4];
            self.stream.read_exact(&mut len)?;
            let len = u32::from_be_bytes(len) as usize;
            if len > 64 << 20 {
                return Err(SelftestError::Call {
                    call,
                    detail: format!("frame of {len} bytes"),
                });
            }
            let mut payload = vec![0u8; len];
            self.stream.read_exact(&mut payload)?;
            let resp = Response::decode(payload.as_slice())?;
            if resp.id != id {
                continue;
            }
            return match resp.kind {
                Some(response::Kind::Error(e)) => Err(SelftestError::Call {
                    call,
                    detail: e.message,
                }),
                Some(k) => Ok(k),
                None => Err(SelftestError::Call {
                    call,
                    detail: "empty answer".into(),
                }),
            };
        }
    }

    /// Hello: returns (kernel release, cpus).
    pub fn hello(&mut self) -> Result<(String, u32), SelftestError> {
        match self.call(
            "hello",
            request::Kind::Hello(HelloRequest {
                api_version: isola_proto::GUEST_API_VERSION,
            }),
        )? {
            response::Kind::Hello(h) => Ok((h.kernel_release, h.cpus)),
            _ => Err(unexpected("hello")),
        }
    }

    /// Runs `argv` in the guest: (exit code, stdout).
    pub fn exec(&mut self, argv: &[&str]) -> Result<(i32, Vec<u8>), SelftestError> {
        match self.call(
            "exec",
            request::Kind::Exec(ExecRequest {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                env: Vec::new(),
                stdin: Vec::new(),
                timeout_ms: 30_000,
            }),
        )? {
            response::Kind::Exec(r) => Ok((r.exit_code, r.stdout)),
            _ => Err(unexpected("exec")),
        }
    }

    /// mount(2) in the guest.
    pub fn mount(
        &mut self,
        source: &str,
        target: &str,
        fstype: &str,
        readonly: bool,
    ) -> Result<(), SelftestError> {
        match self.call(
            "mount",
            request::Kind::Mount(MountRequest {
                source: source.into(),
                target: target.into(),
                fstype: fstype.into(),
                data: String::new(),
                readonly,
            }),
        )? {
            response::Kind::Mount(_) => Ok(()),
            _ => Err(unexpected("mount")),
        }
    }

    /// Reads a guest file.
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>, SelftestError> {
        match self.call(
            "read_file",
            request::Kind::ReadFile(ReadFileRequest {
                path: path.into(),
                max_bytes: 0,
            }),
        )? {
            response::Kind::ReadFile(r) => Ok(r.data),
            _ => Err(unexpected("read_file")),
        }
    }

    /// Gives eth0 an address.
    pub fn configure_eth0(&mut self, addr: Ipv4Addr, prefix: u32) -> Result<(), SelftestError> {
        match self.call(
            "configure_interface",
            request::Kind::ConfigureInterface(ConfigureInterfaceRequest {
                name: "eth0".into(),
                mac: String::new(),
                addresses: vec![IpAddress {
                    address: addr.to_string(),
                    prefix_len: prefix,
                }],
                routes: Vec::new(),
                mtu: 0,
            }),
        )? {
            response::Kind::ConfigureInterface(_) => Ok(()),
            _ => Err(unexpected("configure_interface")),
        }
    }

    /// Asks the guest to power off.
    pub fn shutdown(&mut self) -> Result<(), SelftestError> {
        match self.call("shutdown", request::Kind::Shutdown(ShutdownRequest {}))? {
            response::Kind::Shutdown(_) => Ok(()),
            _ => Err(unexpected("shutdown")),
        }
    }
}

fn unexpected(call: &'static str) -> SelftestError {
    SelftestError::Call {
        call,
        detail: "unexpected answer".into(),
    }
}

fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends ICMP echo requests to `dst` (raw socket, needs root) until one is answered or
/// `tries` have gone unanswered; returns the round trip.
pub fn ping(dst: Ipv4Addr, tries: u32) -> Result<Duration, SelftestError> {
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: fd was just created and is owned only here.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 300_000,
    };
    // SAFETY: SO_RCVTIMEO reads a timeval of the given size.
    unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let ident = (std::process::id() & 0xffff) as u16;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    for seq in 0..tries as u16 {
        let mut pkt = [0u8; 16];
        pkt[0] = 8; // echo request
        pkt[4..6].copy_from_slice(&ident.to_be_bytes());
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        pkt[8..].copy_from_slice(b"isolavmm");
        let sum = icmp_checksum(&pkt);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
        let sent = Instant::now();
        // SAFETY: pkt and addr are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                raw,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n < 0 {
            std::thread::sleep(Duration::from_millis(300));
            continue;
        }
        while sent.elapsed() < Duration::from_millis(300) {
            let mut buf = [0u8; 256];
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            let ihl = usize::from(buf[0] & 0xf) * 4;
            if n >= ihl + 8 && buf[ihl] == 0 && buf[ihl + 4..ihl + 6] == ident.to_be_bytes() {
                return Ok(sent.elapsed());
            }
        }
    }
    Err(SelftestError::Check(format!(
        "no ICMP echo reply from {dst} after {tries} tries"
    )))
}

/// Gives the host side of `tap` the first address of the guest's subnet and brings it up
/// (with `ip`, which the rig's busybox provides).
fn configure_host_tap(tap: &str, guest: Ipv4Addr, prefix: u32) -> Result<(), SelftestError> {
    let mask = u32::MAX.checked_shl(32 - prefix.min(32)).unwrap_or(0);
    let host = Ipv4Addr::from((u32::from(guest) & mask) + 1);
    for args in [
        vec![
            "addr".to_string(),
            "add".into(),
            format!("{host}/{prefix}"),
            "dev".into(),
            tap.into(),
        ],
        vec!["link".to_string(), "set".into(), tap.into(), "up".into()],
    ] {
        let out = std::process::Command::new("ip").args(&args).output()?;
        if !out.status.success() {
            return Err(SelftestError::Check(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}

/// What the self-test checks beyond hello, exec and shutdown.
#[derive(Debug, Default, Clone)]
pub struct Checks {
    /// Mount /dev/vda (ext4, read-only) and expect `hello.txt` to hold this.
    pub blk_expect: Option<String>,
    /// Give eth0 this address/prefix, give the host's TAP (`.2`) the first address of
    /// that subnet, and ping the guest.
    pub net: Option<(Ipv4Addr, u32, String)>,
    /// Mount this virtio-fs tag and expect `hello.txt` in it to hold `.1`.
    pub fs: Option<(String, String)>,
}

/// Runs the self-test against the agent at `socket`, printing one `selftest:` line per
/// check; `launched` is when the VMM started (for the hello figure).
pub fn run(socket: &Path, launched: Instant, checks: &Checks) -> Result<(), SelftestError> {
    let mut agent = Agent::connect(socket, Duration::from_secs(10))?;
    agent.set_timeout(Duration::from_secs(60))?;
    let (kernel, cpus) = agent.hello()?;
    println!(
        "selftest: hello ok kernel={kernel} cpus={cpus} ms={}",
        launched.elapsed().as_millis()
    );
    let (code, out) = agent.exec(&["/init", "--version"])?;
    if code != 0 {
        return Err(SelftestError::Check(format!(
            "exec /init --version exited {code}"
        )));
    }
    println!("selftest: exec ok {}", String::from_utf8_lossy(&out).trim());
    if let Some(expect) = &checks.blk_expect {
        agent.mount("/dev/vda", "/mnt/disk", "ext4", true)?;
        let got = agent.read_file("/mnt/disk/hello.txt")?;
        if String::from_utf8_lossy(&got).trim() != expect.trim() {
            return Err(SelftestError::Check(format!(
                "blk: hello.txt holds {:?}",
                String::from_utf8_lossy(&got)
            )));
        }
        println!("selftest: blk ok");
    }
    if let Some((addr, prefix, tap)) = &checks.net {
        let (addr, prefix) = (*addr, *prefix);
        configure_host_tap(tap, addr, prefix)?;
        agent.configure_eth0(addr, prefix)?;
        let rtt = ping(addr, 20)?;
        println!("selftest: net ok rtt_us={}", rtt.as_micros());
    }
    if let Some((tag, expect)) = &checks.fs {
        agent.mount(tag, "/mnt/share", "virtiofs", false)?;
        let got = agent.read_file("/mnt/share/hello.txt")?;
        if String::from_utf8_lossy(&got).trim() != expect.trim() {
            return Err(SelftestError::Check(format!(
                "fs: hello.txt holds {:?}",
                String::from_utf8_lossy(&got)
            )));
        }
        println!("selftest: fs ok");
    }
    agent.shutdown()?;
    println!("selftest: shutdown requested");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icmp_checksum_of_a_known_packet() {
        // Echo request, id 1 seq 1, no payload: checksum 0xf7fd.
        let pkt = [8, 0, 0, 0, 0, 1, 0, 1];
        assert_eq!(icmp_checksum(&pkt), 0xf7fd);
    }
}
