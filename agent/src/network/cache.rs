//! The on-disk record of each attachment (under `<root>/cni/results`): the exact config
//! list, arguments and runtime config an ADD ran with, and its result. DEL and CHECK
//! use it, so that they run with what ADD had even after an agent restart or a change in
//! the conf dir. It is written before ADD runs, so that a crash half-way through an ADD
//! still leaves what DEL needs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::conf::RuntimeConf;

/// Errors reading or writing the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file operation failed.
    #[error("CNI result cache {path}: {what}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A cached file is not readable.
    #[error("CNI result cache {path}: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

/// One pod attachment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// `CNI_CONTAINERID` (the sandbox id).
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub if_name: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// `CNI_ARGS`.
    pub cni_args: String,
    /// The network config list ADD ran with (pod CIDR filled in).
    pub config: Value,
    /// The capability args ADD passed.
    pub runtime_config: RuntimeConf,
    /// The final ADD result; `None` while ADD has not completed.
    pub result: Option<Value>,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// A cache in `dir` (created on first write).
    pub fn new(dir: PathBuf) -> Cache {
        Cache { dir }
    }

    fn path(&self, container_id: &str, if_name: &str) -> PathBuf {
        self.dir.join(format!("{container_id}-{if_name}.json"))
    }

    /// Writes an attachment atomically (temp file, fsync, rename).
    pub fn put(&self, a: &Attachment) -> Result<(), CacheError> {
        use std::io::Write;
        let path = self.path(&a.container_id, &a.if_name);
        let io = |what| {
            let path = path.clone();
            move |source| CacheError::Io { path, what, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io("creating the directory"))?;
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(a).map_err(|source| CacheError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(io("creating"))?;
        f.write_all(&bytes).map_err(io("writing"))?;
        f.sync_all().map_err(io("syncing"))?;
        std::fs::rename(&tmp, &path).map_err(io("renaming"))
    }

    /// Reads an attachment; `None` if there is none.
    pub fn get(&self, container_id: &str, if_name: &str) -> Result<Option<Attachment>, CacheError> {
        let path = self.path(container_id, if_name);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| CacheError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CacheError::Io {
                path,
                what: "reading",
                source,
            }),
        }
    }

    /// Deletes an attachment. Idempotent.
    pub fn remove(&self, container_id: &str, if_name: &str) -> Result<(), CacheError> {
        let path = self.path(container_id, if_name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CacheError::Io {
                path,
                what: "removing",
                source,
            }),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_idempotent_remove() {
        let d = tempfile::tempdir().expect("tempdir");
        let c = Cache::new(d.path().join("results"));
        assert_eq!(c.get("a", "eth0").expect("get"), None);
        let a = Attachment {
            container_id: "a".into(),
            if_name: "eth0".into(),
            netns: "/n".into(),
            cni_args: "IgnoreUnknown=1".into(),
            config: serde_json::json!({"name": "x"}),
            runtime_config: RuntimeConf::default(),
            result: Some(serde_json::json!({"ips": []})),
        };
        c.put(&a).expect("put");
        assert_eq!(c.get("a", "eth0").expect("get"), Some(a));
        c.remove("a", "eth0").expect("remove");
        c.remove("a", "eth0").expect("again");
        assert_eq!(c.get("a", "eth0").expect("get"), None);
    }
}
