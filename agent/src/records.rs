//! Pod and container records: kept in redb under the agent's root, mirrored in memory.
//!
//! Every change is committed to redb (fsync) before it is visible in memory, so whatever
//! a client was told survives a crash; a record is written whole in one transaction, so
//! a crash leaves no half-record.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use isola_proto::cri;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::classes::ShimKind;
use crate::ids::{self, Resolved};

const SANDBOXES: TableDefinition<&str, &[u8]> = TableDefinition::new("sandboxes");
const CONTAINERS: TableDefinition<&str, &[u8]> = TableDefinition::new("containers");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Errors of the record store.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The database could not be opened, read or written.
    #[error("record store: {0}")]
    Db(String),
    /// A stored record could not be decoded.
    #[error("record {id}: {reason}")]
    Corrupt {
        /// The record's key.
        id: String,
        /// Why.
        reason: String,
    },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for RecordError {
            fn from(e: $t) -> Self {
                RecordError::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// CRI sandbox state as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxState {
    /// Running and able to take containers.
    Ready,
    /// Stopped, or its shim died.
    NotReady,
}

/// CRI container state as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    /// Created, not started.
    Created,
    /// Started and not known to have exited.
    Running,
    /// Exited (exit code and reason known).
    Exited,
    /// Its state cannot be known (e.g. its shim died while it ran).
    Unknown,
}

impl SandboxState {
    /// The CRI enum value.
    pub fn to_cri(self) -> cri::PodSandboxState {
        match self {
            SandboxState::Ready => cri::PodSandboxState::SandboxReady,
            SandboxState::NotReady => cri::PodSandboxState::SandboxNotready,
        }
    }
}

impl ContainerState {
    /// The CRI enum value.
    pub fn to_cri(self) -> cri::ContainerState {
        match self {
            ContainerState::Created => cri::ContainerState::ContainerCreated,
            ContainerState::Running => cri::ContainerState::ContainerRunning,
            ContainerState::Exited => cri::ContainerState::ContainerExited,
            ContainerState::Unknown => cri::ContainerState::ContainerUnknown,
        }
    }
}

/// Identity of a pod's shim process, enough to reconnect and to tell it from a recycled pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimRecord {
    /// The shim's unix socket.
    pub socket: PathBuf,
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks since boot (/proc/<pid>/stat field 22).
    pub start_time: u64,
}

/// A pod sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// 64 hex.
    pub id: String,
    /// The request's config, as kubelet sent it.
    pub config: cri::PodSandboxConfig,
    /// The resolved runtime handler (never empty).
    pub runtime_handler: String,
    /// The shim kind serving it.
    pub shim_kind: ShimKind,
    /// CRI state.
    pub state: SandboxState,
    /// Why it is not ready, when it is not.
    pub reason: String,
    /// Creation time, ns since the epoch.
    pub created_at_ns: i64,
    /// The shim process, while there is one.
    pub shim: Option<ShimRecord>,
    /// The pod's network namespace path, empty for host network.
    pub netns_path: String,
    /// Pod IP.
    pub ip: String,
    /// Further pod IPs.
    pub additional_ips: Vec<String>,
    /// Shim-reported details (pid of the infra process or VMM, hypervisor, ...).
    pub info: std::collections::BTreeMap<String, String>,
}

impl SandboxRecord {
    /// The pod's metadata (always present: validated at creation).
    pub fn metadata(&self) -> cri::PodSandboxMetadata {
        self.config.metadata.clone().unwrap_or_default()
    }
}

/// A container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// 64 hex.
    pub id: String,
    /// Its pod.
    pub sandbox_id: String,
    /// The request's config.
    pub config: cri::ContainerConfig,
    /// The image as the request named it.
    pub image_ref: String,
    /// The image id (config digest).
    pub image_id: String,
    /// CRI state.
    pub state: ContainerState,
    /// ns since the epoch.
    pub created_at_ns: i64,
    /// ns since the epoch, 0 if never started.
    pub started_at_ns: i64,
    /// ns since the epoch, 0 if not finished.
    pub finished_at_ns: i64,
    /// Exit code once exited.
    pub exit_code: i32,
    /// Brief reason (Completed, Error, OOMKilled, ShimExited...).
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// Absolute log path on the host, empty for none.
    pub log_path: String,
    /// The container's cgroup (cgroupfs path), as its shim reported it.
    #[serde(default)]
    pub cgroup_path: String,
    /// Pid of its init process (on the host, for native pods).
    #[serde(default)]
    pub pid: u32,
}

impl ContainerRecord {
    /// The container's metadata (always present: validated at creation).
    pub fn metadata(&self) -> cri::ContainerMetadata {
        self.config.metadata.clone().unwrap_or_default()
    }
}

/// The key that makes a pod unique: (name, namespace, uid, attempt).
pub fn sandbox_name(md: &cri::PodSandboxMetadata) -> String {
    format!("{}_{}_{}_{}", md.name, md.namespace, md.uid, md.attempt)
}

/// The key that makes a container unique: its name and attempt within its pod.
pub fn container_name(sandbox: &cri::PodSandboxMetadata, md: &cri::ContainerMetadata) -> String {
    format!(
        "{}_{}_{}_{}_{}",
        md.name, sandbox.name, sandbox.namespace, sandbox.uid, md.attempt
    )
}

#[derive(Default)]
struct Mem {
    sandboxes: HashMap<String, SandboxRecord>,
    containers: HashMap<String, ContainerRecord>,
    /// Name key → id, for records and for creations in progress.
    names: HashMap<String, String>,
}

/// The record store.
pub struct Records {
    db: Arc<Database>,
    mem: Mutex<Mem>,
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, RecordError> {
    serde_json::to_vec(value).map_err(|e| RecordError::Db(format!("encoding record: {e}")))
}

impl Records {
    /// Opens (creating) the database at `path` and loads every record.
    pub fn open(path: &Path) -> Result<Records, RecordError> {
        let db = Database::create(path)?;
        let mut mem = Mem::default();
        {
            let tx = db.begin_write()?;
            // Make sure the tables exist so that read transactions find them.
            tx.open_table(SANDBOXES)?;
            tx.open_table(CONTAINERS)?;
            tx.open_table(META)?;
            tx.commit()?;
        }
        let tx = db.begin_read()?;
        for item in tx.open_table(SANDBOXES)?.iter()? {
            let (k, v) = item?;
            let rec: SandboxRecord =
                serde_json::from_slice(v.value()).map_err(|e| RecordError::Corrupt {
                    id: k.value().to_owned(),
                    reason: e.to_string(),
                })?;
            mem.names
                .insert(sandbox_name(&rec.metadata()), rec.id.clone());
            mem.sandboxes.insert(rec.id.clone(), rec);
        }
        for item in tx.open_table(CONTAINERS)?.iter()? {
            let (k, v) = item?;
            let rec: ContainerRecord =
                serde_json::from_slice(v.value()).map_err(|e| RecordError::Corrupt {
                    id: k.value().to_owned(),
                    reason: e.to_string(),
                })?;
            if let Some(sb) = mem.sandboxes.get(&rec.sandbox_id) {
                mem.names.insert(
                    container_name(&sb.metadata(), &rec.metadata()),
                    rec.id.clone(),
                );
            }
            mem.containers.insert(rec.id.clone(), rec);
        }
        drop(tx);
        Ok(Records {
            db: Arc::new(db),
            mem: Mutex::new(mem),
        })
    }

    fn mem(&self) -> MutexGuard<'_, Mem> {
        // A panic while holding the lock cannot leave Mem half-updated (every update is a
        // single insert/remove), so a poisoned lock is still consistent.
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves a unique name for an id being created; on conflict returns the holder's id.
    pub fn reserve_name(&self, name: &str, id: &str) -> Result<(), String> {
        let mut mem = self.mem();
        if let Some(holder) = mem.names.get(name) {
            return Err(holder.clone());
        }
        mem.names.insert(name.to_owned(), id.to_owned());
        Ok(())
    }

    /// Releases a name reserved for `id` (no-op if another id holds it).
    pub fn release_name(&self, name: &str, id: &str) {
        let mut mem = self.mem();
        if mem.names.get(name).map(String::as_str) == Some(id) {
            mem.names.remove(name);
        }
    }

    async fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), RecordError> + Send + 'static,
    ) -> Result<(), RecordError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write()?;
            f(&tx)?;
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| RecordError::Db(format!("record writer task: {e}")))?
    }

    /// Stores (inserts or replaces) a sandbox record.
    pub async fn put_sandbox(&self, rec: SandboxRecord) -> Result<(), RecordError> {
        let bytes = encode(&rec)?;
        let id = rec.id.clone();
        self.write(move |tx| {
            tx.open_table(SANDBOXES)?
                .insert(id.as_str(), bytes.as_slice())?;
            Ok(())
        })
        .await?;
        self.mem().sandboxes.insert(rec.id.clone(), rec);
        Ok(())
    }

    /// Stores (inserts or replaces) a container record.
    pub async fn put_container(&self, rec: ContainerRecord) -> Result<(), RecordError> {
        let bytes = encode(&rec)?;
        let id = rec.id.clone();
        self.write(move |tx| {
            tx.open_table(CONTAINERS)?
                .insert(id.as_str(), bytes.as_slice())?;
            Ok(())
        })
        .await?;
        self.mem().containers.insert(rec.id.clone(), rec);
        Ok(())
    }

    /// Stores several records in one transaction (e.g. a pod and its containers after
    /// its shim died).
    pub async fn put_many(
        &self,
        sandboxes: Vec<SandboxRecord>,
        containers: Vec<ContainerRecord>,
    ) -> Result<(), RecordError> {
        let mut sb_bytes = Vec::new();
        for s in &sandboxes {
            sb_bytes.push((s.id.clone(), encode(s)?));
        }
        let mut c_bytes = Vec::new();
        for c in &containers {
            c_bytes.push((c.id.clone(), encode(c)?));
        }
        self.write(move |tx| {
            let mut t = tx.open_table(SANDBOXES)?;
            for (id, b) in &sb_bytes {
                t.insert(id.as_str(), b.as_slice())?;
            }
            drop(t);
            let mut t = tx.open_table(CONTAINERS)?;
            for (id, b) in &c_bytes {
                t.insert(id.as_str(), b.as_slice())?;
            }
            Ok(())
        })
        .await?;
        let mut mem = self.mem();
        for s in sandboxes {
            mem.sandboxes.insert(s.id.clone(), s);
        }
        for c in containers {
            mem.containers.insert(c.id.clone(), c);
        }
        Ok(())
    }

    /// Removes a container record and releases its name.
    pub async fn remove_container(&self, id: &str) -> Result<(), RecordError> {
        let key = id.to_owned();
        self.write(move |tx| {
            tx.open_table(CONTAINERS)?.remove(key.as_str())?;
            Ok(())
        })
        .await?;
        let mut mem = self.mem();
        if let Some(rec) = mem.containers.remove(id) {
            if let Some(sb) = mem.sandboxes.get(&rec.sandbox_id) {
                let name = container_name(&sb.metadata(), &rec.metadata());
                if mem.names.get(&name).map(String::as_str) == Some(id) {
                    mem.names.remove(&name);
                }
            }
        }
        Ok(())
    }

    /// Removes a sandbox record and every container record of it, in one transaction,
    /// and releases their names.
    pub async fn remove_sandbox(&self, id: &str) -> Result<(), RecordError> {
        let container_ids: Vec<String> = self
            .mem()
            .containers
            .values()
            .filter(|c| c.sandbox_id == id)
            .map(|c| c.id.clone())
            .collect();
        let key = id.to_owned();
        let cids = container_ids.clone();
        self.write(move |tx| {
            let mut t = tx.open_table(CONTAINERS)?;
            for c in &cids {
                t.remove(c.as_str())?;
            }
            drop(t);
            tx.open_table(SANDBOXES)?.remove(key.as_str())?;
            Ok(())
        })
        .await?;
        let mut mem = self.mem();
        let sb_md = mem.sandboxes.get(id).map(|s| s.metadata());
        for c in container_ids {
            if let (Some(rec), Some(md)) = (mem.containers.remove(&c), sb_md.as_ref()) {
                let name = container_name(md, &rec.metadata());
                if mem.names.get(&name) == Some(&c) {
                    mem.names.remove(&name);
                }
            }
        }
        if let Some(rec) = mem.sandboxes.remove(id) {
            let name = sandbox_name(&rec.metadata());
            if mem.names.get(&name).map(String::as_str) == Some(id) {
                mem.names.remove(&name);
            }
        }
        Ok(())
    }

    /// A sandbox by exact id.
    pub fn sandbox(&self, id: &str) -> Option<SandboxRecord> {
        self.mem().sandboxes.get(id).cloned()
    }

    /// A container by exact id.
    pub fn container(&self, id: &str) -> Option<ContainerRecord> {
        self.mem().containers.get(id).cloned()
    }

    /// Every sandbox.
    pub fn sandboxes(&self) -> Vec<SandboxRecord> {
        self.mem().sandboxes.values().cloned().collect()
    }

    /// Every container.
    pub fn containers(&self) -> Vec<ContainerRecord> {
        self.mem().containers.values().cloned().collect()
    }

    /// The containers of one sandbox.
    pub fn containers_of(&self, sandbox_id: &str) -> Vec<ContainerRecord> {
        self.mem()
            .containers
            .values()
            .filter(|c| c.sandbox_id == sandbox_id)
            .cloned()
            .collect()
    }

    /// Resolves a sandbox id or unique prefix.
    pub fn resolve_sandbox(&self, prefix: &str) -> Resolved {
        ids::resolve(prefix, self.mem().sandboxes.keys())
    }

    /// Resolves a container id or unique prefix.
    pub fn resolve_container(&self, prefix: &str) -> Resolved {
        ids::resolve(prefix, self.mem().containers.keys())
    }

    /// Reads a small metadata value (e.g. the pod CIDR).
    pub fn meta(&self, key: &str) -> Result<Option<String>, RecordError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(META)?;
        Ok(t.get(key)?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned()))
    }

    /// Writes a small metadata value.
    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), RecordError> {
        let (k, v) = (key.to_owned(), value.to_owned());
        self.write(move |tx| {
            tx.open_table(META)?.insert(k.as_str(), v.as_bytes())?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str, name: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            config: cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: name.into(),
                    namespace: "ns".into(),
                    uid: "u".into(),
                    attempt: 0,
                }),
                ..Default::default()
            },
            runtime_handler: "native".into(),
            shim_kind: ShimKind::Native,
            state: SandboxState::Ready,
            reason: String::new(),
            created_at_ns: 1,
            shim: None,
            netns_path: String::new(),
            ip: String::new(),
            additional_ips: vec![],
            info: Default::default(),
        }
    }

    fn container(id: &str, sb: &str, name: &str) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            sandbox_id: sb.into(),
            config: cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                ..Default::default()
            },
            image_ref: "busybox".into(),
            image_id: "sha256:x".into(),
            state: ContainerState::Created,
            created_at_ns: 2,
            started_at_ns: 0,
            finished_at_ns: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            log_path: String::new(),
            cgroup_path: String::new(),
            pid: 0,
        }
    }

    #[tokio::test]
    async fn records_survive_reopen_and_names_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.redb");
        {
            let r = Records::open(&path).expect("open");
            r.put_sandbox(sandbox("aa11", "p1")).await.expect("put");
            r.put_sandbox(sandbox("aa22", "p2")).await.expect("put");
            r.put_container(container("cc11", "aa11", "c1"))
                .await
                .expect("put");
            r.set_meta("pod_cidr", "10.1.0.0/16").await.expect("meta");
        }
        let r = Records::open(&path).expect("reopen");
        assert_eq!(r.sandboxes().len(), 2);
        assert_eq!(r.containers_of("aa11").len(), 1);
        assert_eq!(
            r.reserve_name(&sandbox_name(&sandbox("x", "p1").metadata()), "x"),
            Err("aa11".to_string())
        );
        assert_eq!(
            r.meta("pod_cidr").expect("meta").as_deref(),
            Some("10.1.0.0/16")
        );
        assert!(matches!(r.resolve_sandbox("aa"), Resolved::Ambiguous(v) if v.len() == 2));
        assert_eq!(r.resolve_sandbox("aa2"), Resolved::One("aa22".into()));

        r.remove_sandbox("aa11").await.expect("remove");
        assert!(r.container("cc11").is_none());
        r.reserve_name(&sandbox_name(&sandbox("x", "p1").metadata()), "x")
            .expect("name released");
        drop(r);
        let r = Records::open(&path).expect("reopen");
        assert!(r.sandbox("aa11").is_none());
        assert!(r.container("cc11").is_none());
        assert!(r.sandbox("aa22").is_some());
    }
}
