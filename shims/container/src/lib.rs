//! The container logic shared by the native shim and the guest agent: a CRI container
//! config (merged with its image's config) becomes an OCI runtime spec
//! ([`spec`]), which youki's libcontainer runs ([`runner`]); stdout and stderr go to
//! the CRI log format ([`logs`]); [`cgroups`] reads usage and OOM kills; [`systemd`] is
//! the systemd cgroup driver.

pub mod apparmor;
pub mod cgroups;
pub mod logs;
pub mod mounts;
pub mod runner;
pub mod seccomp;
pub mod spec;
pub mod systemd;
pub mod users;
