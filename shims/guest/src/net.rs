//! IPv4 interface set-up through the classic socket ioctls (SIOCSIF*, SIOCADDRT): enough
//! for one address and a few routes per interface without a netlink library in PID 1.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Errors configuring an interface.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An ioctl failed.
    #[error("{op} on {ifname}: {source}")]
    Ioctl {
        /// What was being done.
        op: &'static str,
        /// The interface.
        ifname: String,
        /// The errno.
        source: std::io::Error,
    },
    /// A field of the request is malformed.
    #[error("invalid {field}: {value:?}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
    },
    /// socket(2) failed.
    #[error("socket: {0}")]
    Socket(std::io::Error),
}

/// `struct rtentry` of <net/route.h> (libc has it only for musl and uclibc).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_tos: libc::c_uchar,
    rt_class: libc::c_uchar,
    rt_pad4: [libc::c_short; 3],
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn socket() -> Result<OwnedFd, NetError> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetError::Socket(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(ifname: &str) -> Result<libc::ifreq, NetError> {
    let bytes = ifname.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(NetError::Invalid {
            field: "interface name",
            value: ifname.into(),
        });
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and sockaddr is the
    // generic view the kernel expects for AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(
    fd: &OwnedFd,
    op: &'static str,
    req: libc::c_ulong,
    arg: *mut libc::c_void,
    ifname: &str,
) -> Result<(), NetError> {
    // SAFETY: `arg` points to a live ifreq/rtentry of the type `req` expects.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if rc < 0 {
        return Err(NetError::Ioctl {
            op,
            ifname: ifname.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn ifreq_ioctl(
    fd: &OwnedFd,
    op: &'static str,
    code: libc::c_ulong,
    req: &mut libc::ifreq,
) -> Result<(), NetError> {
    let name: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    let ifname = String::from_utf8_lossy(&name).into_owned();
    ioctl(fd, op, code, (req as *mut libc::ifreq).cast(), &ifname)
}

/// Brings `ifname` up.
pub fn set_up(ifname: &str) -> Result<(), NetError> {
    let fd = socket()?;
    let mut req = ifreq(ifname)?;
    ifreq_ioctl(&fd, "SIOCGIFFLAGS", libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ifreq_ioctl(&fd, "SIOCSIFFLAGS", libc::SIOCSIFFLAGS, &mut req)
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(mac: &str) -> Result<[u8; 6], NetError> {
    let invalid = || NetError::Invalid {
        field: "mac",
        value: mac.into(),
    };
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return Err(invalid());
    }
    let mut out = [0u8; 6];
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16).map_err(|_| invalid())?;
    }
    Ok(out)
}

/// Sets the MAC address of `ifname`.
pub fn set_mac(ifname: &str, mac: [u8; 6]) -> Result<(), NetError> {
    let fd = socket()?;
    let mut req = ifreq(ifname)?;
    // SAFETY: all-zero is a valid sockaddr.
    let mut hw: libc::sockaddr = unsafe { std::mem::zeroed() };
    hw.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in hw.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = hw;
    ifreq_ioctl(&fd, "SIOCSIFHWADDR", libc::SIOCSIFHWADDR, &mut req)
}

/// Sets the MTU of `ifname`.
pub fn set_mtu(ifname: &str, mtu: u32) -> Result<(), NetError> {
    let fd = socket()?;
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_mtu = i32::try_from(mtu).map_err(|_| NetError::Invalid {
        field: "mtu",
        value: mtu.to_string(),
    })?;
    ifreq_ioctl(&fd, "SIOCSIFMTU", libc::SIOCSIFMTU, &mut req)
}

/// The netmask of a prefix length.
pub fn netmask(prefix_len: u32) -> Result<Ipv4Addr, NetError> {
    if prefix_len > 32 {
        return Err(NetError::Invalid {
            field: "prefix_len",
            value: prefix_len.to_string(),
        });
    }
    let bits = u32::MAX.checked_shl(32 - prefix_len).unwrap_or(0);
    Ok(Ipv4Addr::from(bits))
}

/// Gives `ifname` its (single) IPv4 address.
pub fn set_address(ifname: &str, addr: Ipv4Addr, prefix_len: u32) -> Result<(), NetError> {
    let mask = netmask(prefix_len)?;
    let fd = socket()?;
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ifreq_ioctl(&fd, "SIOCSIFADDR", libc::SIOCSIFADDR, &mut req)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(mask);
    ifreq_ioctl(&fd, "SIOCSIFNETMASK", libc::SIOCSIFNETMASK, &mut req)
}

/// Parses `a.b.c.d/len` ("" is the default route).
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u32), NetError> {
    if s.is_empty() {
        return Ok((Ipv4Addr::UNSPECIFIED, 0));
    }
    let invalid = || NetError::Invalid {
        field: "route destination",
        value: s.into(),
    };
    let (a, l) = s.split_once('/').ok_or_else(invalid)?;
    let addr: Ipv4Addr = a.parse().map_err(|_| invalid())?;
    let len: u32 = l.parse().map_err(|_| invalid())?;
    if len > 32 {
        return Err(invalid());
    }
    Ok((addr, len))
}

/// Adds a route via `gateway` (or on-link when `None`) through `ifname`.
pub fn add_route(
    ifname: &str,
    dest: Ipv4Addr,
    prefix_len: u32,
    gateway: Option<Ipv4Addr>,
) -> Result<(), NetError> {
    let fd = socket()?;
    let dev = CString::new(ifname).map_err(|_| NetError::Invalid {
        field: "interface name",
        value: ifname.into(),
    })?;
    let mut flags = libc::RTF_UP;
    if prefix_len == 32 {
        flags |= libc::RTF_HOST;
    }
    if gateway.is_some() {
        flags |= libc::RTF_GATEWAY;
    }
    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_in(dest),
        rt_gateway: sockaddr_in(gateway.unwrap_or(Ipv4Addr::UNSPECIFIED)),
        rt_genmask: sockaddr_in(netmask(prefix_len)?),
        rt_flags: flags,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_tos: 0,
        rt_class: 0,
        rt_pad4: [0; 3],
        rt_metric: 0,
        rt_dev: dev.as_ptr() as *mut libc::c_char,
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    let p = (&mut rt as *mut RtEntry).cast();
    ioctl(&fd, "SIOCADDRT", libc::SIOCADDRT, p, ifname)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields() {
        assert_eq!(
            parse_mac("02:00:0a:cb:00:02").unwrap(),
            [2, 0, 10, 0xcb, 0, 2]
        );
        assert!(parse_mac("02:00:0a").is_err());
        assert_eq!(netmask(24).unwrap(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0).unwrap(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(32).unwrap(), Ipv4Addr::BROADCAST);
        assert!(netmask(33).is_err());
        assert_eq!(parse_cidr("").unwrap(), (Ipv4Addr::UNSPECIFIED, 0));
        assert_eq!(
            parse_cidr("10.1.0.0/16").unwrap(),
            (Ipv4Addr::new(10, 1, 0, 0), 16)
        );
        assert!(parse_cidr("10.1.0.0").is_err());
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }
}
