//! isola's images and root filesystems.
//!
//! [`ImageStore`] is everything the agent needs for CRI's `ImageService` and for the root
//! filesystems of containers:
//!
//! | call | CRI | what it does |
//! |---|---|---|
//! | [`ImageStore::open`] | | opens (or creates) the store under a root dir, cleans what a crash left |
//! | [`ImageStore::pull`] | PullImage | fetches, verifies, unpacks and records an image |
//! | [`ImageStore::status`] | ImageStatus | finds an image by id, id prefix, `repo:tag`, `repo@digest` |
//! | [`ImageStore::list`] | ListImages | all images, or those a filter reference names |
//! | [`ImageStore::remove`] | RemoveImage | forgets an image (idempotent), then collects garbage |
//! | [`ImageStore::fs_info`] | ImageFsInfo | bytes and inodes used under the root, and its path |
//! | [`ImageStore::prepare`] | CreateContainer | a container's writable snapshot; returns the overlay [`Mount`] |
//! | [`ImageStore::snapshot_mounts`] | | the mounts of an existing snapshot (after an agent restart) |
//! | [`ImageStore::remove_snapshot`] | RemoveContainer | drops a snapshot (idempotent) |
//! | [`ImageStore::snapshot_usage`] | ContainerStats | bytes and inodes of the writable layer |
//! | [`ImageStore::gc`] | | removes layers, blobs and snapshot dirs nothing refers to |
//!
//! Errors are one [`Error`] enum whose variants map onto gRPC codes (see each variant).
//!
//! ## On disk (under the root the agent gives, e.g. `/var/lib/isola/images`)
//!
//! ```text
//! records.redb                 image and snapshot records (redb)
//! blobs/sha256/<hex>           verified blobs: image configs and compressed layers
//! layers/<chain id hex>/       one unpacked layer, an overlayfs lower dir
//! snapshots/<container id>/    upper/ and work/ of a container's overlay
//! tmp/                         work in progress; emptied on open
//! ```
//!
//! Every file or directory is made in `tmp/` and renamed into place when complete, and a
//! record is written only after the files it names are in place, so a crash at any
//! instant leaves at worst unreferenced files, which [`ImageStore::gc`] removes. Layer
//! reference counts are not stored: a layer is in use while an image record or a snapshot
//! record names its chain id, which cannot drift from the truth.

mod config;
mod error;
mod reference;
mod registry;
mod store;
mod unpack;
mod usage;

pub use config::RegistryConfig;
pub use error::{Error, Result};
pub use reference::{Reference, ReferenceError, DEFAULT_DOMAIN, DEFAULT_TAG};
pub use registry::Credentials;
pub use store::ImageStore;
pub use usage::FsUsage;

use serde::{Deserialize, Serialize};

/// One image as recorded: what CRI's `Image` message and the container spec need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The image id: the digest of its config blob (`sha256:...`).
    pub id: String,
    /// Normalised `repo:tag` names (`docker.io/library/busybox:latest`).
    pub repo_tags: Vec<String>,
    /// `repo@digest` names; the digest is of what was pulled (the index for a
    /// multi-platform image).
    pub repo_digests: Vec<String>,
    /// Bytes of the image's blobs as the registry serves them (config + compressed
    /// layers).
    pub size: u64,
    /// The OCI image config, exactly as pulled (its sha256 is `id`).
    pub config_json: String,
    /// The uid from the config's `User`, when it is numeric (CRI `Image.uid`).
    pub uid: Option<i64>,
    /// The user name from the config's `User`, when it is not numeric (CRI
    /// `Image.username`).
    pub username: String,
    /// Chain ids of the layers, lowest first.
    pub chain_ids: Vec<String>,
    /// Digests of the compressed layer blobs, lowest first.
    pub layer_digests: Vec<String>,
    /// Digest of the image manifest (for linux/amd64).
    pub manifest_digest: String,
}

impl ImageRecord {
    /// The parts of the image config that a container spec uses.
    pub fn config(&self) -> ImageConfig {
        #[derive(Deserialize)]
        struct Outer {
            #[serde(default)]
            config: Option<ImageConfig>,
        }
        serde_json::from_str::<Outer>(&self.config_json)
            .ok()
            .and_then(|o| o.config)
            .unwrap_or_default()
    }
}

/// The runtime part (`config`) of an OCI image config: defaults for a container.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    /// `User`: `user`, `uid`, `user:group` or `uid:gid`.
    #[serde(default)]
    pub user: Option<String>,
    /// `Env`: `KEY=value` entries.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// `Entrypoint`.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// `WorkingDir`.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `StopSignal`, e.g. `SIGTERM`.
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// `Labels`.
    #[serde(default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    /// `Volumes` (keys are container paths).
    #[serde(default)]
    pub volumes: Option<std::collections::BTreeMap<String, serde_json::Value>>,
}

/// What a shim mounts. isola's snapshots are one overlay each:
/// `kind = "overlay"`, `source = "overlay"`, options `lowerdir=...`, `upperdir=...`,
/// `workdir=...`. `target` is empty: the shim mounts it at the container's rootfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// File system type (`overlay`).
    pub kind: String,
    /// Mount source (`overlay`).
    pub source: String,
    /// Where to mount, relative to the container; empty for the root file system.
    pub target: String,
    /// Mount options, one per entry.
    pub options: Vec<String>,
}

/// A container's snapshot record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The container id the snapshot belongs to.
    pub container_id: String,
    /// The image it was made from.
    pub image_id: String,
    /// The image's chain ids, lowest first (kept here so that removing the image does not
    /// take the layers from under the container).
    pub chain_ids: Vec<String>,
}

/// What [`ImageStore::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Unpacked layers removed.
    pub layers: usize,
    /// Blobs removed.
    pub blobs: usize,
    /// Orphaned snapshot directories removed.
    pub snapshots: usize,
}

/// The uid or user name in an image config's `User`, as kubelet reads CRI's `Image`:
/// a numeric user gives a uid, anything else a user name; a group part is ignored.
pub fn user_of(user: &str) -> (Option<i64>, String) {
    if user.is_empty() {
        return (None, String::new());
    }
    let u = user.split(':').next().unwrap_or_default();
    match u.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, u.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_as_kubelet_reads_them() {
        assert_eq!(user_of(""), (None, String::new()));
        assert_eq!(user_of("1000"), (Some(1000), String::new()));
        assert_eq!(user_of("1000:1000"), (Some(1000), String::new()));
        assert_eq!(user_of("nobody"), (None, "nobody".into()));
        assert_eq!(user_of("nobody:nogroup"), (None, "nobody".into()));
    }

    #[test]
    fn image_config_from_json() {
        let rec = ImageRecord {
            id: String::new(),
            repo_tags: vec![],
            repo_digests: vec![],
            size: 0,
            config_json: r#"{"architecture":"amd64","os":"linux","config":{"User":"1000","Env":["PATH=/bin"],"Cmd":["sh"],"WorkingDir":"/w","StopSignal":"SIGINT"},"rootfs":{"type":"layers","diff_ids":[]}}"#.into(),
            uid: None,
            username: String::new(),
            chain_ids: vec![],
            layer_digests: vec![],
            manifest_digest: String::new(),
        };
        let c = rec.config();
        assert_eq!(c.user.as_deref(), Some("1000"));
        assert_eq!(c.cmd, Some(vec!["sh".to_string()]));
        assert_eq!(c.working_dir.as_deref(), Some("/w"));
        assert_eq!(c.stop_signal.as_deref(), Some("SIGINT"));
        assert_eq!(c.env, Some(vec!["PATH=/bin".to_string()]));
    }
}
