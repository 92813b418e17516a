//! Finding and opening the agent's virtio-console port.
//!
//! The port's node number follows device order (`/dev/vport1p1`, not always `vport0p1`),
//! so the port is looked up by the name the VMM gave it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Errors finding the port.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// No port carried the agent's name before the deadline.
    #[error("no virtio-console port named {name} within {waited:?} (is virtio_console probed?)")]
    NotFound {
        /// The name looked for.
        name: &'static str,
        /// How long we waited.
        waited: Duration,
    },
    /// The device node could not be opened.
    #[error("open {path}: {source}")]
    Open {
        /// The node.
        path: PathBuf,
        /// The errno.
        source: std::io::Error,
    },
}

/// The device node of the port named `name`, if it exists now.
pub fn find_port(name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in entries.flatten() {
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim_end() == name {
            let node = PathBuf::from("/dev").join(entry.file_name());
            if node.exists() {
                return Some(node);
            }
        }
    }
    None
}

/// Waits up to `timeout` for the agent port to appear and opens it read-write.
pub fn open_agent_port(timeout: Duration) -> Result<File, PortError> {
    let start = Instant::now();
    loop {
        if let Some(path) = find_port(crate::AGENT_PORT_NAME) {
            return OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(|source| PortError::Open { path, source });
        }
        if start.elapsed() >= timeout {
            return Err(PortError::NotFound {
                name: crate::AGENT_PORT_NAME,
                waited: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
