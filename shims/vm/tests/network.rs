//! The guest's eth0 exchanges packets with a TAP in a network namespace the test made.
//!
//! Only addresses inside that namespace are used (10.203.x.0/24); nothing leaves it.

mod common;

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use isola_proto::guest::{ConfigureInterfaceRequest, IpAddress, Route};
use isola_vm::{Device, Hypervisor};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// A named netns, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        Netns(name.into())
    }

    fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.0, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Runs `f` on a thread that has joined this netns.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on a valid netns fd only changes this (short-lived) thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Opens a TAP named `name` in the calling thread's netns.
fn open_tap(name: &str) -> OwnedFd {
    let path = CString::new("/dev/net/tun").unwrap();
    // SAFETY: open(2) of a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "open /dev/net/tun: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we pass.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    fd
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends ICMP echo requests to `dst` from the calling thread's netns until one is
/// answered; returns the round trip.
fn ping(dst: Ipv4Addr, attempts: u32) -> Option<Duration> {
    // SAFETY: socket(2); checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 500_000,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval of the given size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    let ident: u16 = (std::process::id() & 0xffff) as u16;
    for seq in 0..attempts as u16 {
        let mut pkt = vec![8u8, 0, 0, 0];
        pkt.extend_from_slice(&ident.to_be_bytes());
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend_from_slice(b"isola-vm-test-payload");
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        let sent = Instant::now();
        // SAFETY: sendto with a valid buffer and sockaddr_in.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert_eq!(
            n,
            pkt.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
        while sent.elapsed() < Duration::from_millis(500) {
            let mut buf = [0u8; 1500];
            // SAFETY: recv into a buffer of the given length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
            if n >= ihl + 8
                && src == dst
                && buf[ihl] == 0
                && buf[ihl + 4..ihl + 6] == ident.to_be_bytes()
            {
                return Some(sent.elapsed());
            }
        }
    }
    None
}

#[test]
fn guest_eth0_exchanges_packets_with_a_tap_in_a_netns() {
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new(&format!("isola-vmtest-{}", std::process::id()));
    let tap = ns.run(|| open_tap("tap0"));
    ns.exec(&["addr", "add", "10.203.7.1/24", "dev", "tap0"]);
    ns.exec(&["link", "set", "tap0", "up"]);

    let mut vm = vm("net", dir.path(), |_| {});
    vm.add_device(Device::Net {
        tap,
        mac: Some("02:00:0a:cb:07:02".into()),
    })
    .unwrap();
    vm.start().expect("start");
    let mut agent = vm.agent().unwrap();
    agent.set_timeout(BOOT_TIMEOUT);
    agent.hello().expect("hello");
    agent
        .configure_interface(ConfigureInterfaceRequest {
            name: "eth0".into(),
            mac: "02:00:0a:cb:07:02".into(),
            addresses: vec![IpAddress {
                address: "10.203.7.2".into(),
                prefix_len: 24,
            }],
            routes: vec![Route {
                destination: String::new(),
                gateway: "10.203.7.1".into(),
            }],
            mtu: 1500,
        })
        .expect("configure eth0");
    let rtt = ns.run(|| ping(Ipv4Addr::new(10, 203, 7, 2), 20));
    let rtt = rtt.expect("the guest answers ICMP echo from the netns");
    eprintln!("ping rtt through TAP + virtio-net under TCG: {rtt:?}");
    // The guest learned the netns side's MAC: packets went both ways.
    let arp = String::from_utf8(agent.read_file("/proc/net/arp").unwrap()).unwrap();
    assert!(arp.contains("10.203.7.1"), "{arp}");
    let route = String::from_utf8(agent.read_file("/proc/net/route").unwrap()).unwrap();
    assert!(
        route
            .lines()
            .any(|l| l.starts_with("eth0\t00000000\t0107CB0A")),
        "default route: {route}"
    );

    shutdown_cleanly(&mut vm, &dir.path().join("run"));
    let name = ns.0.clone();
    drop(ns);
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&name),
        "netns leaked"
    );
}
