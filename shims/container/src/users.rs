//! Users and groups resolved inside a container's root filesystem (its /etc/passwd and
//! /etc/group), as runc does, never the host's.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

/// Errors resolving a user.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// A user name that the image's /etc/passwd does not list.
    #[error("user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    /// A group name that the image's /etc/group does not list.
    #[error("group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
}

/// A resolved identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Supplementary gids (from /etc/group membership and the request).
    pub additional_gids: Vec<u32>,
    /// Home directory, for $HOME.
    pub home: String,
}

/// Reads a file of the rootfs without following any symlink out of it: the path is
/// resolved as if the rootfs were `/` (openat2 with RESOLVE_IN_ROOT), so an image whose
/// /etc/passwd links to a host file reads its own tree, not the host's.
pub fn read_in_root(rootfs: &Path, rel: &str) -> Option<String> {
    let root = std::fs::File::open(rootfs).ok()?;
    let c = std::ffi::CString::new(rel).ok()?;
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_IN_ROOT: u64 = 0x10;
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_IN_ROOT,
    };
    use std::os::fd::AsRawFd;
    // SAFETY: openat2 reads `how` (a valid repr(C) open_how of the size passed) and the
    // NUL-terminated path; it returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a new descriptor owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut f = std::fs::File::from(owned);
    let mut s = String::new();
    // Bounded: a passwd file is small; a huge one is not worth reading whole.
    f.by_ref().take(4 << 20).read_to_string(&mut s).ok()?;
    Some(s)
}

struct Passwd {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn passwd(rootfs: &Path) -> Vec<Passwd> {
    read_in_root(rootfs, "etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(Passwd {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_owned(),
            })
        })
        .collect()
}

struct Group {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn groups(rootfs: &Path) -> Vec<Group> {
    read_in_root(rootfs, "etc/group")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(Group {
                name: f[0].to_owned(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect()
}

/// Resolves a user spec as Docker reads an image's `User` (`name`, `uid`, `name:group`,
/// `uid:gid`, ...), with an optional explicit gid taking precedence over the group part,
/// and extra gids appended.
pub fn resolve(
    rootfs: &Path,
    user: &str,
    explicit_gid: Option<u32>,
    extra_gids: &[u32],
) -> Result<Identity, UserError> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let users = passwd(rootfs);
    let groups = groups(rootfs);
    let (uid, mut gid, home, name) = if u.is_empty() {
        (0, 0, "/root".to_owned(), Some("root".to_owned()))
    } else if let Ok(uid) = u.parse::<u32>() {
        match users.iter().find(|p| p.uid == uid) {
            Some(p) => (uid, p.gid, p.home.clone(), Some(p.name.clone())),
            // A numeric uid need not exist in the image (as in Kubernetes' runAsUser).
            None => (uid, 0, "/".to_owned(), None),
        }
    } else {
        let p = users
            .iter()
            .find(|p| p.name == u)
            .ok_or_else(|| UserError::UnknownUser(u.to_owned()))?;
        (p.uid, p.gid, p.home.clone(), Some(p.name.clone()))
    };
    if let Some(g) = g.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                groups
                    .iter()
                    .find(|x| x.name == g)
                    .ok_or_else(|| UserError::UnknownGroup(g.to_owned()))?
                    .gid
            }
        };
    }
    if let Some(g) = explicit_gid {
        gid = g;
    }
    let mut additional: Vec<u32> = Vec::new();
    if let Some(name) = &name {
        for grp in &groups {
            if grp.members.iter().any(|m| m == name) && grp.gid != gid {
                additional.push(grp.gid);
            }
        }
    }
    for g in extra_gids {
        if !additional.contains(g) && *g != gid {
            additional.push(*g);
        }
    }
    Ok(Identity {
        uid,
        gid,
        additional_gids: additional,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(d.path().join("etc")).expect("etc");
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1000:web:/home/web:/bin/sh\n",
        )
        .expect("passwd");
        std::fs::write(
            d.path().join("etc/group"),
            "root:x:0:\nweb:x:1000:\nstaff:x:50:web,other\n",
        )
        .expect("group");
        d
    }

    #[test]
    fn names_and_numbers() {
        let r = rootfs();
        let id = resolve(r.path(), "web", None, &[]).expect("web");
        assert_eq!(
            (id.uid, id.gid, id.additional_gids.clone()),
            (1000, 1000, vec![50])
        );
        assert_eq!(id.home, "/home/web");
        let id = resolve(r.path(), "1000:staff", None, &[7]).expect("uid:group");
        assert_eq!((id.uid, id.gid, id.additional_gids), (1000, 50, vec![7]));
        let id = resolve(r.path(), "4242", Some(9), &[]).expect("unknown uid is fine");
        assert_eq!((id.uid, id.gid), (4242, 9));
        let id = resolve(r.path(), "", None, &[]).expect("root");
        assert_eq!((id.uid, id.gid), (0, 0));
        assert!(matches!(
            resolve(r.path(), "nobody", None, &[]),
            Err(UserError::UnknownUser(_))
        ));
        assert!(matches!(
            resolve(r.path(), "web:nogroup", None, &[]),
            Err(UserError::UnknownGroup(_))
        ));
    }

    #[test]
    fn symlinks_stay_inside_the_rootfs() {
        let r = rootfs();
        let host = tempfile::tempdir().expect("host");
        std::fs::write(host.path().join("passwd"), "evil:x:7:7::/:/bin/sh\n").expect("write");
        std::fs::remove_file(r.path().join("etc/passwd")).expect("rm");
        std::os::unix::fs::symlink(host.path().join("passwd"), r.path().join("etc/passwd"))
            .expect("symlink");
        // The absolute link is resolved inside the rootfs, where it does not exist.
        assert!(read_in_root(r.path(), "etc/passwd").is_none());
        assert!(resolve(r.path(), "evil", None, &[]).is_err());
    }
}
