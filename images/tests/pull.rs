//! Pulls from a real registry (Debian's docker-registry on 127.0.0.1), checking the files
//! that land on disk and, through a real overlay mount, what a container would see.
//!
//! Needs root (device nodes, trusted xattrs, overlay mounts) and the Debian packages
//! docker-registry, busybox-static and apache2-utils.

#[path = "../../tests/src/registry.rs"]
#[allow(dead_code)]
mod registry;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use isola_images::{Credentials, Error, ImageStore, RegistryConfig};
use registry::{arch_image, layered_image, Compression, ImageSpec, Registry, Tar};

fn store_for(reg: &[&Registry]) -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let config = RegistryConfig {
        insecure_registries: reg.iter().map(|r| r.addr.clone()).collect(),
        ..RegistryConfig::default()
    };
    let store = ImageStore::open(dir.path().join("images"), config).unwrap();
    (dir, store)
}

fn entries(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

/// An overlay mounted from a snapshot's mount description; unmounted on drop.
struct Mounted(PathBuf);

impl Mounted {
    fn new(m: &isola_images::Mount, at: &Path) -> Mounted {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", &m.kind, &m.source, "-o", &m.options.join(",")])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mounted(at.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layered_image_unpacks_and_mounts_as_an_overlay() {
    let reg = Registry::start().unwrap();
    let pushed = reg
        .push_image("test/layered", "v1", &layered_image().unwrap())
        .unwrap();
    let (dir, store) = store_for(&[&reg]);

    let img = store.pull(&pushed.reference, None).await.unwrap();
    assert_eq!(img.id, pushed.config_digest);
    assert_eq!(img.repo_tags, vec![format!("{}/test/layered:v1", reg.addr)]);
    assert_eq!(
        img.repo_digests,
        vec![format!(
            "{}/test/layered@{}",
            reg.addr, pushed.manifest_digest
        )]
    );
    assert_eq!(img.uid, Some(1000));
    assert_eq!(img.username, "");
    assert_eq!(img.chain_ids.len(), 4);
    assert_eq!(img.chain_ids[0], pushed.diff_ids[0]);
    assert_eq!(img.layer_digests, pushed.layer_digests);
    let cfg = img.config();
    assert_eq!(cfg.cmd, Some(vec!["/bin/sh".to_string()]));
    assert_eq!(cfg.working_dir.as_deref(), Some("/data"));
    assert_eq!(cfg.stop_signal.as_deref(), Some("SIGINT"));
    assert!(cfg.env.unwrap().contains(&"ISOLA=1".to_string()));

    // The unpacked layers, one directory each.
    let l1 = store.layer_path(&img.chain_ids[0]);
    let l2 = store.layer_path(&img.chain_ids[1]);
    assert_eq!(
        std::fs::read(l1.join("bin/busybox")).unwrap(),
        registry::busybox().unwrap()
    );
    assert_eq!(
        std::fs::read_link(l1.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    let dev = std::fs::symlink_metadata(l1.join("dev/testnull")).unwrap();
    assert!(dev.file_type().is_char_device());
    assert_eq!(dev.rdev(), libc::makedev(1, 3));
    assert!(std::fs::symlink_metadata(l1.join("run/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(
        std::fs::metadata(l1.join("etc/hostname")).unwrap().mtime(),
        registry::MTIME as i64
    );
    let wh = std::fs::symlink_metadata(l2.join("data/remove")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout is a 0/0 char device"
    );
    assert!(!l2.join("data/.wh.remove").exists());
    assert_eq!(
        xattr(&l2.join("opq"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        xattr(&l2.join("data/xattr"), "user.isola").as_deref(),
        Some(&b"yes"[..])
    );
    let suid = std::fs::metadata(l2.join("bin/suid")).unwrap();
    assert_eq!(suid.permissions().mode() & 0o7777, 0o4755);
    assert_eq!((suid.uid(), suid.gid()), (1000, 1000));

    // The container's view, through a real overlay mount.
    let mounts = store.prepare("c1", &pushed.reference).await.unwrap();
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].kind, "overlay");
    assert_eq!(store.snapshot_mounts("c1").unwrap().unwrap(), mounts);
    let root = dir.path().join("rootfs");
    {
        let _m = Mounted::new(&mounts[0], &root);
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "two\n"
        );
        assert!(root.join("data/keep").exists());
        assert!(
            !root.join("data/remove").exists(),
            "whiteout hides the lower file"
        );
        assert_eq!(
            entries(&root.join("opq")),
            vec!["c"],
            "opaque dir hides lower entries"
        );
        let a = std::fs::metadata(root.join("etc/hostname")).unwrap();
        let b = std::fs::metadata(root.join("etc/hostname-link")).unwrap();
        assert_eq!(a.ino(), b.ino(), "hard link shares the inode");
        assert_eq!(
            std::fs::read_link(root.join("etc/motd")).unwrap(),
            Path::new("hostname")
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/motd")).unwrap(),
            "two\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("zstd/hello")).unwrap(),
            "zstd\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("plain/hello")).unwrap(),
            "plain\n"
        );
        // Busybox runs from the rootfs.
        let out = Command::new("chroot")
            .arg(&root)
            .args([
                "/bin/sh",
                "-c",
                "/bin/busybox cat /etc/motd; echo written > /data/new",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "two\n");
    }
    let usage = store.snapshot_usage("c1").await.unwrap();
    assert!(usage.inodes_used >= 3, "{usage:?}");
    assert!(usage.used_bytes > 0);
    let snap_upper = dir.path().join("images/snapshots/c1/upper/data/new");
    assert_eq!(std::fs::read_to_string(snap_upper).unwrap(), "written\n");
    assert!(matches!(
        store.prepare("c1", &img.id).await,
        Err(Error::AlreadyExists(_))
    ));

    let mode = std::fs::metadata(dir.path().join("images"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "the store is root's alone");

    let fs = store.fs_info().await.unwrap();
    assert_eq!(fs.path, dir.path().join("images"));
    assert!(fs.used_bytes > 1_000_000, "{fs:?}");
    assert!(fs.inodes_used > 20);

    // Removing the image keeps the layers the snapshot uses; removing the snapshot frees
    // them.
    store.remove(&img.id).await.unwrap();
    assert!(store.status(&img.id).unwrap().is_none());
    assert!(l1.exists());
    store.remove_snapshot("c1").await.unwrap();
    store.remove_snapshot("c1").await.unwrap();
    assert!(!l1.exists());
    assert!(entries(&dir.path().join("images/layers")).is_empty());
    assert!(entries(&dir.path().join("images/blobs/sha256")).is_empty());
    assert!(entries(&dir.path().join("images/snapshots")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_resolve_to_linux_amd64() {
    let reg = Registry::start().unwrap();
    let amd = reg
        .push_image("test/multi", "amd64", &layered_image().unwrap())
        .unwrap();
    let arm = reg
        .push_image("test/multi", "arm64", &arch_image("arm64"))
        .unwrap();
    let oci = reg
        .push_index(
            "test/multi",
            "oci",
            &[(&arm, "linux", "arm64"), (&amd, "linux", "amd64")],
            false,
        )
        .unwrap();
    let docker = reg
        .push_index(
            "test/multi",
            "docker",
            &[(&arm, "linux", "arm64"), (&amd, "linux", "amd64")],
            true,
        )
        .unwrap();
    let only_arm = reg
        .push_index("test/multi", "armonly", &[(&arm, "linux", "arm64")], false)
        .unwrap();
    let (_dir, store) = store_for(&[&reg]);

    let img = store
        .pull(&reg.image("test/multi", "oci"), None)
        .await
        .unwrap();
    assert_eq!(img.id, amd.config_digest);
    assert_eq!(img.manifest_digest, amd.manifest_digest);
    assert!(img
        .repo_digests
        .contains(&format!("{}/test/multi@{oci}", reg.addr)));
    let img2 = store
        .pull(&reg.image("test/multi", "docker"), None)
        .await
        .unwrap();
    assert_eq!(img2.id, amd.config_digest);
    assert!(img2
        .repo_digests
        .contains(&format!("{}/test/multi@{docker}", reg.addr)));
    assert_eq!(img2.repo_tags.len(), 2, "{:?}", img2.repo_tags);
    assert_eq!(store.list(None).unwrap().len(), 1);
    let layer = store.layer_path(&img.chain_ids[2]);
    assert_eq!(
        std::fs::read_to_string(layer.join("zstd/hello")).unwrap(),
        "zstd\n"
    );

    let err = store
        .pull(&reg.image("test/multi", "armonly"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("linux/amd64"), "{err}");
    let _ = only_arm;
    // A single-platform manifest for another platform is refused too, before any layer
    // is fetched.
    let err = store
        .pull(&reg.image("test/multi", "arm64"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("linux/arm64"), "{err}");
    assert_eq!(reg.blob_gets("test/multi", &arm.layer_digests[0]), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_ids_digests_list_and_remove() {
    let reg = Registry::start().unwrap();
    let pushed = reg
        .push_image("test/names", "v1", &arch_image("amd64"))
        .unwrap();
    let mut docker = arch_image("amd64");
    docker.docker = true;
    docker.config = serde_json::json!({ "User": "nobody:nogroup", "Cmd": ["sh"] });
    let other = reg.push_image("test/names", "v2", &docker).unwrap();
    let (dir, store) = store_for(&[&reg]);

    let by_digest = format!("{}/test/names@{}", reg.addr, pushed.manifest_digest);
    let img = store.pull(&by_digest, None).await.unwrap();
    assert!(img.repo_tags.is_empty());
    assert_eq!(img.repo_digests, vec![by_digest.clone()]);
    let img = store
        .pull(&reg.image("test/names", "v1"), None)
        .await
        .unwrap();
    assert_eq!(img.repo_tags, vec![reg.image("test/names", "v1")]);
    assert_eq!(img.repo_digests, vec![by_digest.clone()]);
    let o = store
        .pull(&reg.image("test/names", "v2"), None)
        .await
        .unwrap();
    assert_eq!(o.id, other.config_digest);
    assert_eq!((o.uid, o.username.as_str()), (None, "nobody"));

    let hex = img.id.strip_prefix("sha256:").unwrap();
    for name in [
        img.id.clone(),
        hex.to_string(),
        hex[..12].to_string(),
        reg.image("test/names", "v1"),
        by_digest.clone(),
    ] {
        assert_eq!(
            store.status(&name).unwrap().map(|i| i.id),
            Some(img.id.clone()),
            "{name}"
        );
    }
    assert!(store
        .status(&reg.image("test/names", "v3"))
        .unwrap()
        .is_none());
    assert_eq!(store.list(None).unwrap().len(), 2);
    assert_eq!(
        store.list(Some(&reg.image("test/names", "v2"))).unwrap()[0].id,
        o.id
    );
    assert!(store.list(Some("nothere")).unwrap().is_empty());

    // Records survive a restart; a crash's leftovers in tmp/ are cleaned.
    drop(store);
    let root = dir.path().join("images");
    // What a crash could leave: work in tmp/, and files renamed into place whose record
    // was never written.
    std::fs::create_dir(root.join("tmp/leftover")).unwrap();
    std::fs::create_dir(root.join("layers").join("e".repeat(64))).unwrap();
    std::fs::write(root.join("blobs/sha256").join("f".repeat(64)), b"x").unwrap();
    std::fs::create_dir_all(root.join("snapshots/orphan/upper")).unwrap();
    let layers_before = entries(&root.join("layers")).len();
    let store = ImageStore::open(
        &root,
        RegistryConfig {
            insecure_registries: vec![reg.addr.clone()],
            ..Default::default()
        },
    )
    .unwrap();
    assert!(entries(&root.join("tmp")).is_empty());
    assert_eq!(entries(&root.join("layers")).len(), layers_before - 1);
    assert!(!root.join("blobs/sha256").join("f".repeat(64)).exists());
    assert!(entries(&root.join("snapshots")).is_empty());
    assert_eq!(
        store
            .status(&reg.image("test/names", "v1"))
            .unwrap()
            .unwrap(),
        img
    );

    store.remove(&reg.image("test/names", "v1")).await.unwrap();
    store.remove(&reg.image("test/names", "v1")).await.unwrap();
    store
        .remove("sha256:0000000000000000000000000000000000000000000000000000000000000000")
        .await
        .unwrap();
    assert!(store.status(&img.id).unwrap().is_none());
    assert_eq!(store.list(None).unwrap().len(), 1);
    assert_eq!(entries(&root.join("layers")).len(), o.chain_ids.len());
    store.remove(&o.id).await.unwrap();
    assert!(entries(&root.join("layers")).is_empty());
    assert!(entries(&root.join("blobs/sha256")).is_empty());

    let bad = store.pull("Not/A:Valid:Ref", None).await.unwrap_err();
    assert!(matches!(bad, Error::InvalidReference(_)), "{bad}");
    assert!(bad.to_string().contains("Not/A:Valid:Ref"));
    let missing = store
        .pull(&reg.image("test/names", "nope"), None)
        .await
        .unwrap_err();
    assert!(matches!(missing, Error::NotFound(_)), "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_with_and_without_credentials() {
    let reg = Registry::start_with_auth("isola", "s3cret").unwrap();
    let pushed = reg
        .push_image("private/img", "1", &arch_image("amd64"))
        .unwrap();
    let (dir, store) = store_for(&[&reg]);

    let err = store.pull(&pushed.reference, None).await.unwrap_err();
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err}");
    let wrong = Credentials {
        username: "isola".into(),
        password: "wrong".into(),
        ..Default::default()
    };
    let err = store
        .pull(&pushed.reference, Some(wrong))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err}");
    assert!(store.list(None).unwrap().is_empty());
    assert!(entries(&dir.path().join("images/blobs/sha256")).is_empty());

    let right = Credentials {
        username: "isola".into(),
        password: "s3cret".into(),
        ..Default::default()
    };
    let img = store.pull(&pushed.reference, Some(right)).await.unwrap();
    assert_eq!(img.id, pushed.config_digest);
    let layer = store.layer_path(&img.chain_ids[0]);
    assert_eq!(
        std::fs::read_to_string(layer.join("arch")).unwrap(),
        "amd64\n"
    );

    // The docker-config form: base64("user:password").
    store.remove(&img.id).await.unwrap();
    let auth = Credentials {
        auth: "aXNvbGE6czNjcmV0".into(),
        ..Default::default()
    };
    store.pull(&pushed.reference, Some(auth)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_anonymous_and_from_an_identity_token() {
    let reg = Registry::start_with_token_auth(&["pub/img"], &["priv/img"], "refresh-me").unwrap();
    let public = reg
        .push_image("pub/img", "1", &arch_image("amd64"))
        .unwrap();
    let mut private_spec = arch_image("amd64");
    private_spec.config = serde_json::json!({ "Cmd": ["private"] });
    let private = reg.push_image("priv/img", "1", &private_spec).unwrap();
    let (_dir, store) = store_for(&[&reg]);

    // Anonymous bearer token, as Docker Hub hands out.
    let img = store.pull(&public.reference, None).await.unwrap();
    assert_eq!(img.id, public.config_digest);

    // The anonymous token does not cover the private repository.
    let err = store.pull(&private.reference, None).await.unwrap_err();
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err}");
    let wrong = Credentials {
        identity_token: "not-it".into(),
        ..Default::default()
    };
    let err = store
        .pull(&private.reference, Some(wrong))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err}");
    let right = Credentials {
        identity_token: "refresh-me".into(),
        ..Default::default()
    };
    let img = store.pull(&private.reference, Some(right)).await.unwrap();
    assert_eq!(img.id, private.config_digest);
}

/// Asserts a failed pull left nothing: no record, nothing in tmp/, and after gc no
/// layer or blob.
async fn assert_nothing_kept(store: &ImageStore, root: &Path) {
    assert!(store.list(None).unwrap().is_empty());
    assert!(entries(&root.join("tmp")).is_empty(), "tmp/ is empty");
    store.gc().await.unwrap();
    assert!(entries(&root.join("layers")).is_empty());
    assert!(entries(&root.join("blobs/sha256")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layers_are_refused_with_nothing_left_behind() {
    let reg = Registry::start().unwrap();
    let good = Tar::new().file("ok", b"ok\n", 0o644).finish();
    let dotdot = Tar::new()
        .file("fine", b"1\n", 0o644)
        .file("../../../../tmp/isola-escape-dotdot", b"x\n", 0o644)
        .finish();
    let symlink_out = Tar::new()
        .file("fine", b"1\n", 0o644)
        .symlink("escape", "../../../../../../tmp")
        .finish();
    let through_link = Tar::new()
        .symlink("lib", "/tmp")
        .file("lib/isola-escape-through", b"x\n", 0o644)
        .finish();
    let hard_out = Tar::new().hardlink("h", "../../../etc/passwd").finish();
    let (dir, store) = store_for(&[&reg]);
    let root = dir.path().join("images");
    for (tag, layer, entry) in [
        ("dotdot", dotdot, "../../../../tmp/isola-escape-dotdot"),
        ("symlink", symlink_out, "escape"),
        ("through", through_link, "lib/isola-escape-through"),
        ("hardlink", hard_out, "\"h\""),
    ] {
        let spec = ImageSpec::new(vec![
            (good.clone(), Compression::Gzip),
            (layer, Compression::Gzip),
        ]);
        let pushed = reg.push_image("test/evil", tag, &spec).unwrap();
        let err = store.pull(&pushed.reference, None).await.unwrap_err();
        assert!(matches!(err, Error::UnsafeLayer { .. }), "{tag}: {err}");
        assert!(
            err.to_string().contains(entry),
            "{tag}: {err} names {entry}"
        );
        assert_nothing_kept(&store, &root).await;
    }
    assert!(!Path::new("/tmp/isola-escape-dotdot").exists());
    assert!(!Path::new("/tmp/isola-escape-through").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_and_size_mismatches_fail_the_pull() {
    let reg = Registry::start().unwrap();
    let (dir, store) = store_for(&[&reg]);
    let root = dir.path().join("images");

    let pushed = reg
        .push_image("test/corrupt", "1", &arch_image("amd64"))
        .unwrap();
    reg.corrupt_blob(&pushed.layer_digests[0]).unwrap();
    let err = store.pull(&pushed.reference, None).await.unwrap_err();
    assert!(matches!(err, Error::Verification { .. }), "{err}");
    assert_nothing_kept(&store, &root).await;

    let mut lie = arch_image("amd64");
    lie.layers[0].0 = Tar::new().file("other", b"other\n", 0o644).finish();
    lie.lie_about_first_layer_size = Some(3);
    let pushed = reg.push_image("test/corrupt", "size", &lie).unwrap();
    let err = store.pull(&pushed.reference, None).await.unwrap_err();
    assert!(matches!(err, Error::Verification { .. }), "{err}");
    assert!(err.to_string().contains("3 bytes"), "{err}");
    assert_nothing_kept(&store, &root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_share_one_download() {
    let reg = Registry::start().unwrap();
    let pushed = reg
        .push_image("test/shared", "1", &layered_image().unwrap())
        .unwrap();
    let (_dir, store) = store_for(&[&reg]);
    let (a, b) = tokio::join!(
        store.pull(&pushed.reference, None),
        store.pull(&pushed.reference, None)
    );
    assert_eq!(a.unwrap().id, b.unwrap().id);
    for d in &pushed.layer_digests {
        assert_eq!(reg.blob_gets("test/shared", d), 1, "{d} fetched once");
    }
    // A second pull of a present image fetches no layer again.
    store.pull(&pushed.reference, None).await.unwrap();
    for d in &pushed.layer_digests {
        assert_eq!(reg.blob_gets("test/shared", d), 1, "{d} fetched once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_shared_by_two_images_is_fetched_once() {
    let reg = Registry::start().unwrap();
    let base = Tar::new()
        .dir("bin/", 0o755)
        .file("bin/busybox", &registry::busybox().unwrap(), 0o755)
        .finish();
    let top = |n: &str| Tar::new().file("name", n.as_bytes(), 0o644).finish();
    let a = ImageSpec::new(vec![
        (base.clone(), Compression::Gzip),
        (top("a"), Compression::Gzip),
    ]);
    let b = ImageSpec::new(vec![
        (base, Compression::Gzip),
        (top("b"), Compression::Gzip),
    ]);
    let pa = reg.push_image("test/share-a", "1", &a).unwrap();
    let pb = reg.push_image("test/share-b", "1", &b).unwrap();
    assert_eq!(pa.layer_digests[0], pb.layer_digests[0]);
    let (_dir, store) = store_for(&[&reg]);
    let (ia, ib) = tokio::join!(
        store.pull(&pa.reference, None),
        store.pull(&pb.reference, None)
    );
    let (ia, ib) = (ia.unwrap(), ib.unwrap());
    assert_eq!(ia.chain_ids[0], ib.chain_ids[0]);
    let shared = &pa.layer_digests[0];
    let gets = reg.blob_gets("test/share-a", shared) + reg.blob_gets("test/share-b", shared);
    assert_eq!(gets, 1, "the shared layer is fetched once");
    // Removing one image keeps the shared layer for the other.
    store.remove(&ia.id).await.unwrap();
    assert!(store
        .layer_path(&ib.chain_ids[0])
        .join("bin/busybox")
        .exists());
    assert!(!store.layer_path(&ia.chain_ids[1]).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_are_tried_first() {
    let upstream = Registry::start().unwrap();
    let mirror = Registry::start().unwrap();
    let pushed = upstream
        .push_image("test/m", "1", &arch_image("amd64"))
        .unwrap();
    // The mirror has the same repository with other content.
    let mirrored = mirror
        .push_image("test/m", "1", &{
            let mut on_mirror = arch_image("amd64");
            on_mirror.layers[0].0 = Tar::new().file("arch", b"mirror\n", 0o644).finish();
            on_mirror
        })
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = RegistryConfig {
        insecure_registries: vec![upstream.addr.clone(), mirror.addr.clone()],
        ..Default::default()
    };
    config
        .mirrors
        .insert(upstream.addr.clone(), vec![mirror.addr.clone()]);
    let store = ImageStore::open(dir.path(), config).unwrap();
    let img = store.pull(&pushed.reference, None).await.unwrap();
    assert_eq!(img.id, mirrored.config_digest);
    // Not on the mirror: falls back to the registry itself.
    let only_up = upstream
        .push_image("test/up", "1", &arch_image("amd64"))
        .unwrap();
    let img = store.pull(&only_up.reference, None).await.unwrap();
    assert_eq!(img.id, only_up.config_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_layers_mount_through_short_links() {
    let reg = Registry::start().unwrap();
    let layers: Vec<(Vec<u8>, Compression)> = (0..70)
        .map(|i| {
            let t = Tar::new()
                .file(&format!("f{i}"), format!("{i}\n").as_bytes(), 0o644)
                .file("top", format!("{i}\n").as_bytes(), 0o644)
                .finish();
            (t, Compression::Gzip)
        })
        .collect();
    let pushed = reg
        .push_image("test/many", "1", &ImageSpec::new(layers))
        .unwrap();
    let (dir, store) = store_for(&[&reg]);
    let img = store.pull(&pushed.reference, None).await.unwrap();
    assert_eq!(img.chain_ids.len(), 70);
    let mounts = store.prepare("many", &img.id).await.unwrap();
    let options = mounts[0].options.join(",");
    assert!(options.len() < 4000, "{} bytes of options", options.len());
    assert!(options.contains("/l/"));
    let root = dir.path().join("rootfs");
    {
        let _m = Mounted::new(&mounts[0], &root);
        assert_eq!(std::fs::read_to_string(root.join("f0")).unwrap(), "0\n");
        assert_eq!(std::fs::read_to_string(root.join("f69")).unwrap(), "69\n");
        assert_eq!(std::fs::read_to_string(root.join("top")).unwrap(), "69\n");
    }
    store.remove_snapshot("many").await.unwrap();
    store.remove(&img.id).await.unwrap();
    assert!(entries(&dir.path().join("images/l")).is_empty());
}

/// The benchmark image: ≥50 MB in several layers. Run with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn big_image_pull_time() {
    let reg = Registry::start().unwrap();
    let pushed = reg
        .push_image("test/big", "1", &registry::big_image(3, 20).unwrap())
        .unwrap();
    for _ in 0..3 {
        let (_dir, store) = store_for(&[&reg]);
        let t = std::time::Instant::now();
        let img = store.pull(&pushed.reference, None).await.unwrap();
        println!(
            "pull of {} MB in {} layers: {:?}",
            img.size >> 20,
            img.chain_ids.len(),
            t.elapsed()
        );
    }
}
