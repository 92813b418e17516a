//! The pod network of a VM pod: the agent made the netns and ran CNI in it (a veth
//! `eth0` with the pod IP); here a TAP joins that veth both ways with tc (a `u32`
//! match-all filter and a `mirred egress redirect` action, as Kata does; this host's
//! kernel has no `matchall`), and the guest's eth0 takes the veth's MAC, addresses and
//! routes.
//!
//! The reading and tc set-up run `ip` and `tc` (iproute2) inside the netns: a netlink
//! library for tc filters and actions would be far more code than these few commands,
//! which run once per pod start.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;

use isola_proto::guest::{ConfigureInterfaceRequest, IpAddress, Route};

/// Name of the pod's interface in the netns (CNI's `IfName`) and in the guest.
pub const POD_IFNAME: &str = "eth0";
/// Name of the TAP in the pod's netns.
pub const TAP_NAME: &str = "tap0_isola";

/// Errors setting up the pod network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A command failed.
    #[error("{what}: {detail}")]
    Command {
        /// The command line.
        what: String,
        /// Its stderr or spawn error.
        detail: String,
    },
    /// The netns holds no usable pod interface.
    #[error("pod network: {0}")]
    Interface(String),
    /// A syscall failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The errno.
        source: std::io::Error,
    },
}

/// The pod interface as CNI left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    /// MAC address.
    pub mac: String,
    /// IPv4 addresses with prefix lengths.
    pub addresses: Vec<(String, u32)>,
    /// Routes (destination, gateway) other than the kernel's connected ones.
    pub routes: Vec<(String, String)>,
    /// MTU.
    pub mtu: u32,
}

impl PodInterface {
    /// The guest request that gives eth0 this identity.
    pub fn guest_request(&self) -> ConfigureInterfaceRequest {
        ConfigureInterfaceRequest {
            name: POD_IFNAME.into(),
            mac: self.mac.clone(),
            addresses: self
                .addresses
                .iter()
                .map(|(a, p)| IpAddress {
                    address: a.clone(),
                    prefix_len: *p,
                })
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|(d, g)| Route {
                    destination: d.clone(),
                    gateway: g.clone(),
                })
                .collect(),
            mtu: self.mtu,
        }
    }
}

fn run_in(netns: &Path, program: &str, args: &[&str]) -> Result<String, NetError> {
    let what = format!("{program} {}", args.join(" "));
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg(program)
        .args(args)
        .output()
        .map_err(|e| NetError::Command {
            what: what.clone(),
            detail: format!("nsenter: {e}"),
        })?;
    if !out.status.success() {
        return Err(NetError::Command {
            what,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Parses `ip -j addr show dev eth0` and `ip -j -4 route show`.
pub fn parse_interface(addr_json: &str, route_json: &str) -> Result<PodInterface, NetError> {
    let addrs: serde_json::Value = serde_json::from_str(addr_json)
        .map_err(|e| NetError::Interface(format!("ip addr output: {e}")))?;
    let link = addrs
        .as_array()
        .and_then(|a| a.first())
        .ok_or_else(|| NetError::Interface(format!("no {POD_IFNAME} in the pod netns")))?;
    let mac = link["address"].as_str().unwrap_or_default().to_string();
    let mtu = link["mtu"].as_u64().unwrap_or(0) as u32;
    let addresses: Vec<(String, u32)> = link["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|i| i["family"] == "inet")
                .filter_map(|i| {
                    Some((
                        i["local"].as_str()?.to_string(),
                        i["prefixlen"].as_u64()? as u32,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    if addresses.is_empty() {
        return Err(NetError::Interface(format!(
            "{POD_IFNAME} in the pod netns has no IPv4 address"
        )));
    }
    let routes_v: serde_json::Value = serde_json::from_str(route_json)
        .map_err(|e| NetError::Interface(format!("ip route output: {e}")))?;
    let routes = routes_v
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["dev"] == POD_IFNAME && r["protocol"] != "kernel")
                .filter_map(|r| {
                    let dst = r["dst"].as_str()?;
                    let dst = if dst == "default" { "0.0.0.0/0" } else { dst };
                    Some((
                        dst.to_string(),
                        r["gateway"].as_str().unwrap_or_default().to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(PodInterface {
        mac,
        addresses,
        routes,
        mtu,
    })
}

/// Reads the pod interface CNI set up in `netns`; `None` when there is none (no CNI
/// network configured: the pod has loopback only, like a native pod then).
pub fn read_interface(netns: &Path) -> Result<Option<PodInterface>, NetError> {
    let links = run_in(netns, "ip", &["-j", "link", "show"])?;
    let links: serde_json::Value = serde_json::from_str(&links)
        .map_err(|e| NetError::Interface(format!("ip link output: {e}")))?;
    let has_pod_if = links
        .as_array()
        .is_some_and(|a| a.iter().any(|l| l["ifname"] == POD_IFNAME));
    if !has_pod_if {
        return Ok(None);
    }
    let addr = run_in(netns, "ip", &["-j", "addr", "show", "dev", POD_IFNAME])?;
    let route = run_in(netns, "ip", &["-j", "-4", "route", "show"])?;
    parse_interface(&addr, &route).map(Some)
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Creates the TAP in `netns` and returns its queue fd (`IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR`). The TAP is not persistent: it goes away with the last fd (the VMM's),
/// so a VMM that dies leaves no TAP behind.
pub fn create_tap(netns: &Path) -> Result<OwnedFd, NetError> {
    let ns = File::open(netns).map_err(|source| NetError::Sys {
        what: "opening the pod netns",
        source,
    })?;
    // setns(2) changes only the calling thread: a thread of its own keeps the rest of
    // the shim in the host's netns.
    std::thread::scope(|s| {
        s.spawn(|| -> Result<OwnedFd, NetError> {
            // SAFETY: setns on an fd we hold open; it only affects this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetError::Sys {
                    what: "entering the pod netns",
                    source: std::io::Error::last_os_error(),
                });
            }
            // SAFETY: open(2) of a constant, NUL-terminated path.
            let fd = unsafe {
                libc::open(
                    c"/dev/net/tun".as_ptr(),
                    libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
                )
            };
            if fd < 0 {
                return Err(NetError::Sys {
                    what: "opening /dev/net/tun",
                    source: std::io::Error::last_os_error(),
                });
            }
            // SAFETY: fd is a fresh descriptor we own.
            let tap = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: an all-zero ifreq is a valid value.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in ifr.ifr_name.iter_mut().zip(TAP_NAME.bytes()) {
                *d = s as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
            // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which outlives the call.
            if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETIFF, &mut ifr) } != 0 {
                return Err(NetError::Sys {
                    what: "creating the TAP (TUNSETIFF)",
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(tap)
        })
        .join()
        .unwrap_or_else(|_| Err(NetError::Interface("the TAP set-up thread panicked".into())))
    })
}

/// Brings the TAP up with the pod interface's MTU and redirects every frame between it
/// and the veth, both ways.
pub fn join_tap(netns: &Path, mtu: u32) -> Result<(), NetError> {
    let mtu = mtu.max(576).to_string();
    run_in(netns, "ip", &["link", "set", TAP_NAME, "mtu", &mtu, "up"])?;
    for (from, to) in [(POD_IFNAME, TAP_NAME), (TAP_NAME, POD_IFNAME)] {
        // A pod started again in the same netns finds the qdisc there: replace it.
        let _ = run_in(netns, "tc", &["qdisc", "del", "dev", from, "ingress"]);
        run_in(netns, "tc", &["qdisc", "add", "dev", from, "ingress"])?;
        run_in(
            netns,
            "tc",
            &[
                "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
                "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cni_interface() {
        let addr = r#"[{"ifindex":3,"ifname":"eth0","mtu":1500,"address":"6a:1f:00:11:22:33",
            "addr_info":[{"family":"inet","local":"10.88.0.5","prefixlen":16},
                         {"family":"inet6","local":"fe80::1","prefixlen":64}]}]"#;
        let route = r#"[{"dst":"default","gateway":"10.88.0.1","dev":"eth0"},
            {"dst":"10.88.0.0/16","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.88.0.5"},
            {"dst":"10.99.0.0/16","gateway":"10.88.0.2","dev":"eth0"}]"#;
        let i = parse_interface(addr, route).expect("parses");
        assert_eq!(i.mac, "6a:1f:00:11:22:33");
        assert_eq!(i.mtu, 1500);
        assert_eq!(i.addresses, vec![("10.88.0.5".to_string(), 16)]);
        assert_eq!(
            i.routes,
            vec![
                ("0.0.0.0/0".to_string(), "10.88.0.1".to_string()),
                ("10.99.0.0/16".to_string(), "10.88.0.2".to_string())
            ]
        );
        assert!(parse_interface("[]", "[]").is_err());
    }
}
