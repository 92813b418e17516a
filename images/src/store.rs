//! The image store: records, content, pulls, snapshots and garbage collection.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};

use futures::StreamExt;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tracing::Instrument;

use crate::config::RegistryConfig;
use crate::error::{Error, IoContext, Result};
use crate::reference::{is_lower_hex, is_valid_digest, Reference};
use crate::registry::{verify_bytes, Credentials, Descriptor, Fetcher, Resolved};
use crate::usage::{measure, FsUsage};
use crate::{user_of, GcStats, ImageRecord, Mount, SnapshotRecord};

const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");

/// Images, their content and containers' snapshots under one root directory.
///
/// Cheap to clone; all clones share one store. Open one per root: the record database is
/// locked by the process that opened it.
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    config: RegistryConfig,
    db: redb::Database,
    /// Pulls and snapshot preparation hold it shared; garbage collection exclusively, so
    /// that it never removes a layer a pull has unpacked but not yet recorded.
    gc_lock: Arc<tokio::sync::RwLock<()>>,
    /// One lock per blob digest or chain id being fetched or unpacked: concurrent pulls
    /// of the same content wait for the first and then find it on disk.
    busy: StdMutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The last [`ImageStore::fs_info`] measurement: kubelet asks every few seconds,
    /// and a walk of a big store is not free. Cleared by every change of the store.
    usage: StdMutex<Option<(std::time::Instant, FsUsage)>>,
}

/// How long an [`ImageStore::fs_info`] measurement is answered again.
const USAGE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.inner.root)
            .finish()
    }
}

#[derive(Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    rootfs: Option<RootFs>,
    #[serde(default)]
    config: Option<crate::ImageConfig>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

impl ImageStore {
    /// Opens the store under `root` (created if missing), with registry settings. Removes
    /// whatever a crash left in `tmp/`. Blocking: call it from `spawn_blocking` or before
    /// the runtime serves requests.
    pub fn open(root: impl Into<PathBuf>, config: RegistryConfig) -> Result<ImageStore> {
        let root = root.into();
        for d in ["blobs/sha256", "layers", "l", "snapshots", "tmp", "empty"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).ctx(|| format!("create {}", p.display()))?;
        }
        // Layers hold set-id binaries and containers' files: no other user may reach them
        // (chain ids of public images are known, so a mode of 0711 would not do).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
                .ctx(|| format!("chmod 0700 {}", root.display()))?;
        }
        let tmp = root.join("tmp");
        for entry in std::fs::read_dir(&tmp).ctx(|| format!("read {}", tmp.display()))? {
            let entry = entry.ctx(|| format!("read {}", tmp.display()))?;
            remove_path(&entry.path())?;
        }
        let db = redb::Database::create(root.join("records.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(IMAGES)?;
        txn.open_table(SNAPSHOTS)?;
        txn.commit()?;
        let store = ImageStore {
            inner: Arc::new(Inner {
                root,
                config,
                db,
                gc_lock: Arc::new(tokio::sync::RwLock::new(())),
                busy: StdMutex::new(HashMap::new()),
                usage: StdMutex::new(None),
            }),
        };
        // Files a crash left between their rename and their record: nothing runs yet, so
        // collecting now is safe.
        store.collect_garbage()?;
        Ok(store)
    }

    /// The root directory of the store.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Pulls `reference` (any form kubelet sends; normalised as Docker does) with
    /// optional credentials, and returns its record. Every blob is verified by digest and
    /// size, every layer by its diff id; on any failure nothing new is recorded and no
    /// partial file stays. Layers already unpacked are not fetched again; concurrent pulls
    /// of the same content share one download.
    pub async fn pull(&self, reference: &str, creds: Option<Credentials>) -> Result<ImageRecord> {
        let r = Reference::parse(reference)?;
        let span = tracing::info_span!("pull", image = %r);
        let res = self.pull_inner(r, creds).instrument(span.clone()).await;
        if res.is_err() {
            // Complete layers of a failed pull are unreferenced: collect them once no
            // pull is running, without making this caller wait for that.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                let store = self.clone();
                handle.spawn(
                    async move {
                        if let Err(e) = store.gc().await {
                            tracing::warn!(error = %e, "garbage collection after a failed pull");
                        }
                    }
                    .instrument(span),
                );
            }
        }
        res
    }

    async fn pull_inner(&self, r: Reference, creds: Option<Credentials>) -> Result<ImageRecord> {
        let started = std::time::Instant::now();
        let creds = creds.unwrap_or_default();
        // Refused early: a malformed `auth` field is the caller's error, not a registry's.
        creds.to_auth()?;
        let mut last_err = None;
        let mut found = None;
        for endpoint in self.inner.config.endpoints(&r.domain) {
            let connected = Fetcher::connect(&self.inner.config, &r, &endpoint, &creds).await;
            let resolved = match connected {
                Ok(fetcher) => fetcher.resolve().await.map(|res| (fetcher, res)),
                Err(e) => Err(e),
            };
            match resolved {
                Ok(pair) => {
                    found = Some(pair);
                    break;
                }
                Err(e) => {
                    tracing::debug!(%endpoint, error = %e, "endpoint failed");
                    last_err = Some(e);
                }
            }
        }
        let Some((fetcher, resolved)) = found else {
            return Err(last_err.unwrap_or_else(|| Error::NotFound(r.to_string())));
        };
        // Shared with the unpack tasks, which run on even if this future is dropped.
        let gc = Arc::new(self.inner.gc_lock.clone().read_owned().await);
        let record = self.fetch_and_unpack(&r, &fetcher, &resolved, &gc).await?;
        let record = self.record_pull(&r, record)?;
        tracing::info!(id = %record.id, elapsed_ms = started.elapsed().as_millis() as u64, "pulled");
        Ok(record)
    }

    async fn fetch_and_unpack(
        &self,
        r: &Reference,
        fetcher: &Fetcher,
        res: &Resolved,
        gc: &GcGuard,
    ) -> Result<ImageRecord> {
        let config_path = self.ensure_blob(fetcher, &res.config).await?;
        let config_bytes = tokio::fs::read(&config_path)
            .await
            .ctx(|| format!("read {}", config_path.display()))?;
        verify_bytes(&config_bytes, &res.config.digest, res.config.size)?;
        let config_json = String::from_utf8(config_bytes).map_err(|_| Error::Unsupported {
            reference: r.to_string(),
            detail: "image config is not UTF-8".into(),
        })?;
        let blob: ConfigBlob =
            serde_json::from_str(&config_json).map_err(|e| Error::Unsupported {
                reference: r.to_string(),
                detail: format!("image config: {e}"),
            })?;
        // A single-platform manifest is taken as it is; its config says what it runs on.
        let arch = blob.architecture.as_deref().unwrap_or_default();
        let os = blob.os.as_deref().unwrap_or_default();
        if !matches!(arch, "" | "amd64") || !matches!(os, "" | "linux") {
            return Err(Error::Unsupported {
                reference: r.to_string(),
                detail: format!("the image is for {os}/{arch}; this node runs linux/amd64"),
            });
        }
        let diff_ids = blob.rootfs.map(|r| r.diff_ids).unwrap_or_default();
        if diff_ids.len() != res.layers.len() {
            return Err(Error::Unsupported {
                reference: r.to_string(),
                detail: format!(
                    "config lists {} diff ids, the manifest {} layers",
                    diff_ids.len(),
                    res.layers.len()
                ),
            });
        }
        if let Some(bad) = diff_ids.iter().find(|d| !is_valid_digest(d)) {
            return Err(Error::Unsupported {
                reference: r.to_string(),
                detail: format!("diff id {bad:?}"),
            });
        }
        let chain_ids = chain_ids(&diff_ids);
        // Owned inputs: a closure over borrowed items makes the future not `Send` (a
        // higher-ranked lifetime rustc cannot prove), and tonic needs `Send`.
        let inputs: Vec<(Descriptor, String, String)> = res
            .layers
            .iter()
            .cloned()
            .zip(diff_ids.iter().cloned())
            .zip(chain_ids.iter().cloned())
            .map(|((d, diff), chain)| (d, diff, chain))
            .collect();
        let jobs: Vec<_> = inputs
            .into_iter()
            .map(|(desc, diff_id, chain_id)| {
                let gc = gc.clone();
                async move {
                    self.ensure_layer(fetcher, &desc, &diff_id, &chain_id, gc)
                        .await
                }
            })
            .collect();
        // Every job runs to its end before an error is returned, so that a failed pull
        // leaves no work behind it.
        let results: Vec<Result<()>> = futures::stream::iter(jobs)
            .buffer_unordered(self.inner.config.concurrency())
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        let user = blob.config.and_then(|c| c.user).unwrap_or_default();
        let (uid, username) = user_of(&user);
        let size = res.config.size as u64 + res.layers.iter().map(|l| l.size as u64).sum::<u64>();
        Ok(ImageRecord {
            id: res.config.digest.clone(),
            repo_tags: r.tagged().into_iter().collect(),
            repo_digests: vec![r.with_digest(&res.top_digest)],
            size,
            config_json,
            uid,
            username,
            chain_ids,
            layer_digests: res.layers.iter().map(|l| l.digest.clone()).collect(),
            manifest_digest: res.manifest_digest.clone(),
        })
    }

    /// Writes the record of a pulled image, merging names with an existing record of the
    /// same id and moving the tag off any other image that had it.
    fn record_pull(&self, r: &Reference, mut new: ImageRecord) -> Result<ImageRecord> {
        self.forget_usage();
        let txn = self.inner.db.begin_write()?;
        {
            let mut t = txn.open_table(IMAGES)?;
            let mut others: Vec<ImageRecord> = Vec::new();
            for row in t.iter()? {
                let (_, v) = row?;
                others.push(serde_json::from_slice(v.value())?);
            }
            for mut other in others {
                if other.id == new.id {
                    for tag in other.repo_tags.drain(..) {
                        if !new.repo_tags.contains(&tag) {
                            new.repo_tags.push(tag);
                        }
                    }
                    for d in other.repo_digests.drain(..) {
                        if !new.repo_digests.contains(&d) {
                            new.repo_digests.push(d);
                        }
                    }
                } else if let Some(tag) = r.tagged() {
                    if other.repo_tags.contains(&tag) {
                        other.repo_tags.retain(|t| *t != tag);
                        t.insert(other.id.as_str(), serde_json::to_vec(&other)?.as_slice())?;
                    }
                }
            }
            new.repo_tags.sort();
            new.repo_digests.sort();
            t.insert(new.id.as_str(), serde_json::to_vec(&new)?.as_slice())?;
        }
        txn.commit()?;
        Ok(new)
    }

    /// The blob's path, downloading and verifying it first if it is not stored yet.
    async fn ensure_blob(&self, fetcher: &Fetcher, desc: &Descriptor) -> Result<PathBuf> {
        let path = self.blob_path(&desc.digest);
        let lock = self.busy_lock(&format!("blob {}", desc.digest));
        let _guard = lock.lock().await;
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        // Removed if this future fails or is dropped (another layer of the pull failed).
        let tmp = TmpGuard(Some(self.tmp_path()));
        let tmp_path = tmp.path().to_path_buf();
        fetcher.download(desc, &tmp_path).await?;
        tokio::fs::rename(&tmp_path, &path)
            .await
            .ctx(|| format!("rename blob into {}", path.display()))?;
        tmp.disarm();
        tracing::debug!(digest = %desc.digest, size = desc.size, "blob stored");
        Ok(path)
    }

    /// Makes sure the layer with `chain_id` is unpacked, fetching its blob if needed.
    async fn ensure_layer(
        &self,
        fetcher: &Fetcher,
        desc: &Descriptor,
        diff_id: &str,
        chain_id: &str,
        gc: GcGuard,
    ) -> Result<()> {
        let dir = self.layer_path(chain_id);
        // Its own key space: the chain id of an uncompressed base layer is its blob's
        // digest, whose lock ensure_blob takes below (one key for both deadlocked).
        let lock = self.busy_lock(&format!("layer {chain_id}"));
        let _guard = lock.lock().await;
        if tokio::fs::try_exists(&dir).await.unwrap_or(false) {
            // A crash may have come between the layer's rename and its short link.
            return make_short_link(&dir);
        }
        let blob = self.ensure_blob(fetcher, desc).await?;
        let tmp = self.tmp_path();
        let layer = desc.digest.clone();
        let want = diff_id.to_string();
        let span = tracing::debug_span!("unpack", layer = %layer);
        tokio::task::spawn_blocking(move || {
            let _gc = gc;
            let _e = span.enter();
            let res = (|| {
                std::fs::create_dir(&tmp).ctx(|| format!("create {}", tmp.display()))?;
                let unpacked = crate::unpack::unpack_layer(&blob, &layer, &tmp)?;
                if unpacked.diff_id != want {
                    return Err(Error::Verification {
                        digest: want.clone(),
                        detail: format!("layer {layer} unpacks to diff id {}", unpacked.diff_id),
                    });
                }
                std::fs::rename(&tmp, &dir)
                    .ctx(|| format!("rename layer into {}", dir.display()))?;
                make_short_link(&dir)
            })();
            if res.is_err() {
                let _ = remove_path(&tmp);
            }
            res
        })
        .await
        .map_err(|e| Error::io("unpack task", std::io::Error::other(e)))?
    }

    fn busy_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.inner.busy.lock().unwrap_or_else(|p| p.into_inner());
        // Drop locks nobody holds any more, so the map does not grow without bound.
        m.retain(|_, l| Arc::strong_count(l) > 1);
        m.entry(key.to_string()).or_default().clone()
    }

    /// The image that `name` refers to: an id (`sha256:<hex>` or bare hex), a reference
    /// (`busybox`, `repo:tag`, `repo@digest`, normalised), or a unique id prefix.
    pub fn status(&self, name: &str) -> Result<Option<ImageRecord>> {
        let all = self.all_images()?;
        Ok(resolve(&all, name).cloned())
    }

    /// All images, or (with a filter) those the filter names as [`status`] reads it.
    ///
    /// [`status`]: ImageStore::status
    pub fn list(&self, filter: Option<&str>) -> Result<Vec<ImageRecord>> {
        let all = self.all_images()?;
        match filter.filter(|f| !f.is_empty()) {
            None => Ok(all),
            Some(f) => Ok(resolve(&all, f).cloned().into_iter().collect()),
        }
    }

    fn all_images(&self) -> Result<Vec<ImageRecord>> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(IMAGES)?;
        let mut v = Vec::new();
        for row in t.iter()? {
            let (_, val) = row?;
            v.push(serde_json::from_slice(val.value())?);
        }
        Ok(v)
    }

    /// Removes the image `name` refers to, with all its tags and digests. Idempotent:
    /// an unknown name is no error. Layers that a snapshot still uses stay until that
    /// snapshot is removed; everything else no image uses is collected.
    pub async fn remove(&self, name: &str) -> Result<()> {
        let Some(img) = self.status(name)? else {
            return Ok(());
        };
        let txn = self.inner.db.begin_write()?;
        txn.open_table(IMAGES)?.remove(img.id.as_str())?;
        txn.commit()?;
        tracing::info!(id = %img.id, "image removed");
        self.gc().await?;
        Ok(())
    }

    /// Bytes and inodes used under the store's root, and the root's path.
    /// A measurement is answered again for a few seconds unless the store changed.
    pub async fn fs_info(&self) -> Result<FsUsage> {
        if let Some((at, u)) = &*self.inner.usage.lock().unwrap_or_else(|p| p.into_inner()) {
            if at.elapsed() < USAGE_TTL {
                return Ok(u.clone());
            }
        }
        let root = self.inner.root.clone();
        let u = tokio::task::spawn_blocking(move || {
            measure(&root).ctx(|| format!("measure {}", root.display()))
        })
        .await
        .map_err(|e| Error::io("measure task", std::io::Error::other(e)))??;
        *self.inner.usage.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((std::time::Instant::now(), u.clone()));
        Ok(u)
    }

    /// Removes unpacked layers and blobs that no image and no snapshot refers to, and
    /// snapshot directories without a record. Runs while no pull is in progress.
    pub async fn gc(&self) -> Result<GcStats> {
        let _gc = self.inner.gc_lock.write().await;
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.collect_garbage())
            .await
            .map_err(|e| Error::io("gc task", std::io::Error::other(e)))?
    }

    /// The work of [`ImageStore::gc`]; the caller keeps pulls out.
    fn collect_garbage(&self) -> Result<GcStats> {
        self.forget_usage();
        let images = self.all_images()?;
        let snapshots = self.all_snapshots()?;
        let mut chains: HashSet<String> = HashSet::new();
        let mut blobs: HashSet<String> = HashSet::new();
        for i in &images {
            chains.extend(i.chain_ids.iter().map(|c| hex_of(c).to_string()));
            blobs.insert(hex_of(&i.id).to_string());
            blobs.extend(i.layer_digests.iter().map(|d| hex_of(d).to_string()));
        }
        let mut snaps: HashSet<String> = HashSet::new();
        for s in &snapshots {
            chains.extend(s.chain_ids.iter().map(|c| hex_of(c).to_string()));
            snaps.insert(s.container_id.clone());
        }
        let mut stats = GcStats::default();
        let root = &self.inner.root;
        stats.layers = self.sweep(&root.join("layers"), &chains)?;
        stats.blobs = self.sweep(&root.join("blobs/sha256"), &blobs)?;
        stats.snapshots = self.sweep(&root.join("snapshots"), &snaps)?;
        let shorts: HashSet<String> = chains.iter().map(|c| short_name(c)).collect();
        self.sweep(&root.join("l"), &shorts)?;
        if stats != GcStats::default() {
            tracing::info!(?stats, "garbage collected");
        }
        Ok(stats)
    }

    fn forget_usage(&self) {
        *self.inner.usage.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Removes the entries of `dir` whose names are not in `keep`. Each goes to `tmp/`
    /// first (one rename), so a crash never leaves half a layer under a valid name.
    fn sweep(&self, dir: &Path, keep: &HashSet<String>) -> Result<usize> {
        let mut n = 0;
        for entry in std::fs::read_dir(dir).ctx(|| format!("read {}", dir.display()))? {
            let entry = entry.ctx(|| format!("read {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            let tmp = self.tmp_path();
            std::fs::rename(entry.path(), &tmp)
                .ctx(|| format!("move {} away", entry.path().display()))?;
            remove_path(&tmp)?;
            n += 1;
        }
        Ok(n)
    }

    /// Creates the writable snapshot of container `container_id` over the layers of the
    /// image `image` (id or any name [`status`] takes) and returns the mount to make.
    /// Nothing is mounted here: the shim mounts it.
    ///
    /// [`status`]: ImageStore::status
    pub async fn prepare(&self, container_id: &str, image: &str) -> Result<Vec<Mount>> {
        check_container_id(container_id)?;
        let _gc = self.inner.gc_lock.read().await;
        let img = self
            .status(image)?
            .ok_or_else(|| Error::NotFound(format!("image {image:?}")))?;
        if self.snapshot(container_id)?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "snapshot for container {container_id:?}"
            )));
        }
        let dir = self.snapshot_path(container_id);
        let tmp = self.tmp_path();
        let made = (|| {
            std::fs::create_dir(&tmp)?;
            std::fs::create_dir(tmp.join("upper"))?;
            std::fs::create_dir(tmp.join("work"))?;
            if dir.exists() {
                // A directory without a record: a crash between the two; start afresh.
                remove_path(&dir).map_err(std::io::Error::other)?;
            }
            std::fs::rename(&tmp, &dir)
        })();
        if let Err(e) = made {
            let _ = remove_path(&tmp);
            return Err(Error::io(format!("create snapshot {}", dir.display()), e));
        }
        self.forget_usage();
        let rec = SnapshotRecord {
            container_id: container_id.to_string(),
            image_id: img.id.clone(),
            chain_ids: img.chain_ids.clone(),
        };
        let txn = self.inner.db.begin_write()?;
        txn.open_table(SNAPSHOTS)?
            .insert(container_id, serde_json::to_vec(&rec)?.as_slice())?;
        txn.commit()?;
        tracing::debug!(container = container_id, image = %img.id, "snapshot prepared");
        Ok(self.mounts_of(&rec))
    }

    /// The mounts of an existing snapshot, or `None` if the container has none.
    pub fn snapshot_mounts(&self, container_id: &str) -> Result<Option<Vec<Mount>>> {
        Ok(self.snapshot(container_id)?.map(|s| self.mounts_of(&s)))
    }

    /// The snapshot record of a container.
    pub fn snapshot(&self, container_id: &str) -> Result<Option<SnapshotRecord>> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(SNAPSHOTS)?;
        let v = t.get(container_id)?;
        Ok(match v {
            Some(v) => Some(serde_json::from_slice(v.value())?),
            None => None,
        })
    }

    /// All snapshot records.
    pub fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(SNAPSHOTS)?;
        let mut v = Vec::new();
        for row in t.iter()? {
            let (_, val) = row?;
            v.push(serde_json::from_slice(val.value())?);
        }
        Ok(v)
    }

    /// Removes a container's snapshot (its writable layer). Idempotent. The overlay must
    /// be unmounted first. Layers of images removed meanwhile are collected.
    pub async fn remove_snapshot(&self, container_id: &str) -> Result<()> {
        if check_container_id(container_id).is_err() {
            return Ok(());
        }
        let Some(rec) = self.snapshot(container_id)? else {
            return Ok(());
        };
        let txn = self.inner.db.begin_write()?;
        txn.open_table(SNAPSHOTS)?.remove(container_id)?;
        txn.commit()?;
        self.forget_usage();
        let dir = self.snapshot_path(container_id);
        let tmp = self.tmp_path();
        // The rename takes the layer out of sight at once; deleting the tree (a directory
        // operation per file, milliseconds each on some disks) goes on in the background,
        // as containerd's snapshot GC does. What a crash leaves in tmp/ is removed when
        // the store opens.
        let moved = tokio::task::spawn_blocking(move || -> Result<Option<PathBuf>> {
            match std::fs::rename(&dir, &tmp) {
                Ok(()) => Ok(Some(tmp)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(format!("remove {}", dir.display()), e)),
            }
        })
        .await
        .map_err(|e| Error::io("remove snapshot task", std::io::Error::other(e)))??;
        if let Some(tmp) = moved {
            tokio::task::spawn_blocking(move || {
                if let Err(e) = remove_path(&tmp) {
                    tracing::warn!(error = %e, "removing a container's writable layer");
                }
            });
        }
        // The image may have been removed while the container used it.
        let image_gone = self.status(&rec.image_id)?.is_none();
        if image_gone {
            self.gc().await?;
        }
        Ok(())
    }

    /// Bytes and inodes of a container's writable layer.
    pub async fn snapshot_usage(&self, container_id: &str) -> Result<FsUsage> {
        check_container_id(container_id)?;
        if self.snapshot(container_id)?.is_none() {
            return Err(Error::NotFound(format!(
                "snapshot for container {container_id:?}"
            )));
        }
        let upper = self.snapshot_path(container_id).join("upper");
        tokio::task::spawn_blocking(move || {
            measure(&upper).ctx(|| format!("measure {}", upper.display()))
        })
        .await
        .map_err(|e| Error::io("measure task", std::io::Error::other(e)))?
    }

    fn mounts_of(&self, s: &SnapshotRecord) -> Vec<Mount> {
        let dir = self.snapshot_path(&s.container_id);
        // overlayfs lists the top-most lower dir first.
        let mut lower: Vec<String> = if s.chain_ids.is_empty() {
            vec![self.inner.root.join("empty").display().to_string()]
        } else {
            s.chain_ids
                .iter()
                .rev()
                .map(|c| self.layer_path(c).display().to_string())
                .collect()
        };
        // mount(2) takes at most a page of options: with many layers, name them through
        // their short links (`l/<16 hex>`, as Docker's overlay2 does) where they exist.
        if lower.iter().map(|l| l.len() + 1).sum::<usize>() > MAX_FULL_LOWERDIR {
            lower = s
                .chain_ids
                .iter()
                .rev()
                .map(|c| {
                    let link = self.inner.root.join("l").join(short_name(c));
                    let full = self.layer_path(c);
                    match std::fs::read_link(&link) {
                        Ok(t) if t == short_link_target(&full) => link.display().to_string(),
                        _ => full.display().to_string(),
                    }
                })
                .collect();
        }
        vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                format!("lowerdir={}", lower.join(":")),
                format!("upperdir={}", dir.join("upper").display()),
                format!("workdir={}", dir.join("work").display()),
            ],
        }]
    }

    /// Where the unpacked layer with this chain id lives (exists once complete).
    pub fn layer_path(&self, chain_id: &str) -> PathBuf {
        self.inner.root.join("layers").join(hex_of(chain_id))
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.inner.root.join("blobs/sha256").join(hex_of(digest))
    }

    fn snapshot_path(&self, container_id: &str) -> PathBuf {
        self.inner.root.join("snapshots").join(container_id)
    }

    fn tmp_path(&self) -> PathBuf {
        let n: u64 = rand::random();
        self.inner.root.join("tmp").join(format!("{n:016x}"))
    }
}

/// Keeps garbage collection out while a pull (and its unpack tasks) run.
type GcGuard = Arc<tokio::sync::OwnedRwLockReadGuard<()>>;

/// A path in `tmp/` removed when dropped, unless disarmed after it was renamed away.
struct TmpGuard(Option<PathBuf>);

impl TmpGuard {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = remove_path(&p);
        }
    }
}

/// Finds the image `name` refers to among `all`.
fn resolve<'a>(all: &'a [ImageRecord], name: &str) -> Option<&'a ImageRecord> {
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    // An exact id, with or without "sha256:".
    let bare = name.strip_prefix("sha256:").unwrap_or(name);
    if bare.len() == 64 && is_lower_hex(bare) {
        if let Some(i) = all.iter().find(|i| hex_of(&i.id) == bare) {
            return Some(i);
        }
    }
    if let Ok(r) = Reference::parse(name) {
        let want = r.to_string();
        let hit = if r.digest.is_some() {
            all.iter().find(|i| i.repo_digests.contains(&want))
        } else {
            all.iter().find(|i| i.repo_tags.contains(&want))
        };
        if hit.is_some() {
            return hit;
        }
    }
    if is_lower_hex(bare) {
        let mut m = all.iter().filter(|i| hex_of(&i.id).starts_with(bare));
        if let (Some(one), None) = (m.next(), m.next()) {
            return Some(one);
        }
    }
    None
}

/// Lower dirs longer than this in total go through short links.
const MAX_FULL_LOWERDIR: usize = 2048;

/// The name of a layer's short link in `l/`: 16 hex digits of its chain id.
fn short_name(chain_id: &str) -> String {
    hex_of(chain_id).chars().take(16).collect()
}

fn short_link_target(layer_dir: &Path) -> PathBuf {
    Path::new("../layers").join(layer_dir.file_name().unwrap_or_default())
}

/// Creates `l/<short>` -> `../layers/<hex>` for an unpacked layer directory (a relative
/// target, so the store can move). An existing link is left as it is: if it is a
/// collision, building a snapshot's mounts sees it points elsewhere and uses the full
/// path.
fn make_short_link(layer_dir: &Path) -> Result<()> {
    let name = layer_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(root) = layer_dir.parent().and_then(Path::parent) else {
        return Ok(());
    };
    let link = root.join("l").join(short_name(&name));
    match std::os::unix::fs::symlink(short_link_target(layer_dir), &link) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io(format!("create {}", link.display()), e)),
    }
}

/// The hex part of `sha256:<hex>`.
fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// Chain ids as the OCI image spec defines them: ChainID(L0) = DiffID(L0),
/// ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)).
pub(crate) fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => {
                let mut h = Sha256::new();
                h.update(prev.as_bytes());
                h.update(b" ");
                h.update(d.as_bytes());
                format!("sha256:{}", hex::encode(h.finalize()))
            }
        };
        out.push(next);
    }
    out
}

/// A container id names a directory: it may not be empty, `.`, `..` or hold a `/` or NUL.
fn check_container_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 255
        && id != "."
        && id != ".."
        && !id.contains(['/', '\0', ':', ','])
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "container id {id:?} cannot name a snapshot"
        )))
    }
}

/// Removes a file or a whole directory tree (symlinks are removed, not followed).
fn remove_path(p: &Path) -> Result<()> {
    let md = match std::fs::symlink_metadata(p) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("stat {}", p.display()), e)),
    };
    let r = if md.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", p.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::sha256_digest;

    fn rec(id: &str, tags: &[&str], digests: &[&str]) -> ImageRecord {
        ImageRecord {
            id: id.into(),
            repo_tags: tags.iter().map(|s| s.to_string()).collect(),
            repo_digests: digests.iter().map(|s| s.to_string()).collect(),
            size: 0,
            config_json: "{}".into(),
            uid: None,
            username: String::new(),
            chain_ids: vec![],
            layer_digests: vec![],
            manifest_digest: String::new(),
        }
    }

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], sha256_digest(format!("{a} {b}").as_bytes()));
    }

    #[test]
    fn names_resolve_like_crictl() {
        let id1 = format!("sha256:{}", "1".repeat(60) + "abcd");
        let id2 = format!("sha256:{}", "2".repeat(64));
        let d = format!("sha256:{}", "d".repeat(64));
        let all = vec![
            rec(
                &id1,
                &["docker.io/library/busybox:latest"],
                &[&format!("docker.io/library/busybox@{d}")],
            ),
            rec(&id2, &["127.0.0.1:5000/x/y:v1"], &[]),
        ];
        let f = |n: &str| resolve(&all, n).map(|i| i.id.clone());
        assert_eq!(f(&id1), Some(id1.clone()));
        assert_eq!(f(hex_of(&id1)), Some(id1.clone()));
        assert_eq!(f("busybox"), Some(id1.clone()));
        assert_eq!(f("busybox:latest"), Some(id1.clone()));
        assert_eq!(f("docker.io/library/busybox"), Some(id1.clone()));
        assert_eq!(f(&format!("busybox@{d}")), Some(id1.clone()));
        assert_eq!(f("111"), Some(id1.clone()));
        assert_eq!(f("sha256:2222"), Some(id2.clone()));
        assert_eq!(f("127.0.0.1:5000/x/y:v1"), Some(id2.clone()));
        assert_eq!(f("busybox:1.36"), None);
        assert_eq!(f(""), None);
        assert_eq!(f("nothere"), None);
    }

    #[test]
    fn futures_are_send() {
        fn send<T: Send>(_: &T) {}
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path(), RegistryConfig::default()).unwrap();
        send(&store.pull("busybox", None));
        send(&store.remove("busybox"));
        send(&store.prepare("c", "busybox"));
        send(&store.remove_snapshot("c"));
        send(&store.gc());
        send(&store.fs_info());
        send(&store.snapshot_usage("c"));
    }

    #[test]
    fn container_ids_that_cannot_name_a_directory_are_refused() {
        for bad in ["", ".", "..", "a/b", "-x", "a:b"] {
            assert!(check_container_id(bad).is_err(), "{bad}");
        }
        check_container_id("0123abc_def-1.2").unwrap();
    }
}
