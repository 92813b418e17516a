//! The CRI ImageService end to end: isolad over its real socket pulling from a real
//! registry (Debian's docker-registry on 127.0.0.1), and the files that land under its
//! root. Needs root and the Debian packages docker-registry, busybox-static,
//! apache2-utils.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use isola_proto::cri;
use isola_tests::registry::{arch_image, layered_image, Compression, ImageSpec, Registry, Tar};
use isola_tests::*;
use tonic::Code;

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

async fn agent_for(regs: &[&Registry]) -> Agent {
    let hosts: Vec<String> = regs.iter().map(|r| format!("{:?}", r.addr)).collect();
    Agent::start_with(AgentOptions {
        config: format!("[registry]\ninsecure_registries = [{}]\n", hosts.join(", ")),
    })
    .await
}

async fn pull(
    images: &mut Images,
    image: &str,
    auth: Option<cri::AuthConfig>,
) -> Result<String, tonic::Status> {
    images
        .pull_image(cri::PullImageRequest {
            image: spec(image),
            auth,
            sandbox_config: None,
        })
        .await
        .map(|r| r.into_inner().image_ref)
}

async fn status(images: &mut Images, image: &str) -> cri::ImageStatusResponse {
    images
        .image_status(cri::ImageStatusRequest {
            image: spec(image),
            verbose: true,
        })
        .await
        .expect("ImageStatus")
        .into_inner()
}

async fn list(images: &mut Images, filter: Option<&str>) -> Vec<cri::Image> {
    images
        .list_images(cri::ListImagesRequest {
            filter: filter.map(|f| cri::ImageFilter { image: spec(f) }),
        })
        .await
        .expect("ListImages")
        .into_inner()
        .images
}

async fn remove(images: &mut Images, image: &str) -> Result<(), tonic::Status> {
    images
        .remove_image(cri::RemoveImageRequest { image: spec(image) })
        .await
        .map(|_| ())
}

fn dir_entries(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_status_list_fsinfo_remove_over_cri() {
    let reg = Registry::start().expect("registry");
    let pushed = reg
        .push_image("e2e/layered", "v1", &layered_image().unwrap())
        .unwrap();
    let mut agent = agent_for(&[&reg]).await;
    let mut images = agent.images().await;

    let id = pull(&mut images, &pushed.reference, None)
        .await
        .expect("pull");
    assert_eq!(id, pushed.config_digest);

    // ImageStatus by tag, id, id prefix and digest; verbose info has the config.
    let st = status(&mut images, &pushed.reference).await;
    let img = st.image.expect("image present");
    assert_eq!(img.id, pushed.config_digest);
    assert_eq!(img.repo_tags, vec![reg.image("e2e/layered", "v1")]);
    let by_digest = format!("{}/e2e/layered@{}", reg.addr, pushed.manifest_digest);
    assert_eq!(img.repo_digests, vec![by_digest.clone()]);
    assert_eq!(img.uid.map(|u| u.value), Some(1000));
    assert!(img.size > 1_000_000, "size {}", img.size);
    let info: serde_json::Value = serde_json::from_str(&st.info["info"]).expect("info is JSON");
    assert_eq!(info["imageSpec"]["config"]["Cmd"][0], "/bin/sh");
    assert_eq!(info["imageSpec"]["config"]["WorkingDir"], "/data");
    assert_eq!(info["chainIDs"].as_array().unwrap().len(), 4);
    for name in [
        id.clone(),
        id.trim_start_matches("sha256:")[..12].to_string(),
        by_digest.clone(),
    ] {
        let got = status(&mut images, &name).await.image.map(|i| i.id);
        assert_eq!(got.as_deref(), Some(id.as_str()), "{name}");
    }
    assert!(status(&mut images, &reg.image("e2e/layered", "v2"))
        .await
        .image
        .is_none());

    // The unpacked layers are on disk under <root>/images.
    let store = agent.root().join("images");
    let chain: Vec<String> = info["chainIDs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c.as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect();
    let l2 = store.join("layers").join(&chain[1]);
    let a = std::fs::metadata(l2.join("etc/hostname")).unwrap();
    let b = std::fs::metadata(l2.join("etc/hostname-link")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(
        std::fs::read_link(l2.join("etc/motd")).unwrap(),
        Path::new("hostname")
    );
    assert_eq!(
        std::fs::symlink_metadata(l2.join("data/remove"))
            .unwrap()
            .rdev(),
        0
    );

    // ListImages, with and without a filter.
    let other = reg
        .push_image("e2e/other", "1", &arch_image("amd64"))
        .unwrap();
    pull(&mut images, &other.reference, None)
        .await
        .expect("pull other");
    assert_eq!(list(&mut images, None).await.len(), 2);
    let only = list(&mut images, Some(&other.reference)).await;
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].id, other.config_digest);
    assert!(list(&mut images, Some("nothere:1")).await.is_empty());

    // ImageFsInfo: the store's path, bytes and inodes in use.
    let fs = images
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .expect("ImageFsInfo")
        .into_inner();
    let u = &fs.image_filesystems[0];
    assert_eq!(
        u.fs_id.as_ref().unwrap().mountpoint,
        store.display().to_string()
    );
    assert!(u.used_bytes.as_ref().unwrap().value > 2_000_000);
    assert!(u.inodes_used.as_ref().unwrap().value > 20);
    assert!(u.timestamp > 0);

    // Records survive a restart (kill -9 included).
    agent.kill9();
    agent.restart().await;
    let mut images = agent.images().await;
    assert_eq!(list(&mut images, None).await.len(), 2);
    assert_eq!(
        status(&mut images, &pushed.reference)
            .await
            .image
            .map(|i| i.id),
        Some(id.clone())
    );

    // RemoveImage by tag; idempotent; the layers go.
    remove(&mut images, &pushed.reference)
        .await
        .expect("remove");
    remove(&mut images, &pushed.reference)
        .await
        .expect("remove again");
    remove(&mut images, &id).await.expect("remove by id again");
    assert!(status(&mut images, &id).await.image.is_none());
    assert!(!l2.exists());
    remove(&mut images, &other.config_digest)
        .await
        .expect("remove other");
    assert!(list(&mut images, None).await.is_empty());
    assert!(dir_entries(&store.join("layers")).is_empty());
    assert!(dir_entries(&store.join("blobs/sha256")).is_empty());
}

/// An image whose base layer is an uncompressed tar: its chain id, diff id and blob
/// digest are one digest (the pull once deadlocked on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncompressed_layers_over_cri() {
    let reg = Registry::start().expect("registry");
    let base = Tar::new().file("plain.txt", b"plain\n", 0o644).finish();
    let top = Tar::new().file("top.txt", b"top\n", 0o644).finish();
    let pushed = reg
        .push_image(
            "e2e/plain",
            "latest",
            &ImageSpec::new(vec![(base, Compression::None), (top, Compression::None)]),
        )
        .unwrap();
    let agent = agent_for(&[&reg]).await;
    let mut images = agent.images().await;
    let name = format!("{}/e2e/plain:latest", reg.addr);
    let id = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        pull(&mut images, &name, None),
    )
    .await
    .expect("the pull finishes")
    .expect("pull");
    assert_eq!(id, pushed.config_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_lists_and_zstd_layers_over_cri() {
    let reg = Registry::start().expect("registry");
    let amd = reg
        .push_image("e2e/multi", "amd64", &layered_image().unwrap())
        .unwrap();
    let arm = reg
        .push_image("e2e/multi", "arm64", &arch_image("arm64"))
        .unwrap();
    let list_digest = reg
        .push_index(
            "e2e/multi",
            "latest",
            &[(&arm, "linux", "arm64"), (&amd, "linux", "amd64")],
            true,
        )
        .unwrap();
    let agent = agent_for(&[&reg]).await;
    let mut images = agent.images().await;
    // No tag: ":latest", as Docker normalises it.
    let name = format!("{}/e2e/multi", reg.addr);
    let id = pull(&mut images, &name, None).await.expect("pull");
    assert_eq!(id, amd.config_digest);
    let img = status(&mut images, &name).await.image.unwrap();
    assert_eq!(img.repo_tags, vec![format!("{name}:latest")]);
    assert_eq!(img.repo_digests, vec![format!("{name}@{list_digest}")]);
    let chain = status(&mut images, &name).await.info["info"].clone();
    let info: serde_json::Value = serde_json::from_str(&chain).unwrap();
    let zstd_layer = info["chainIDs"][2]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    let p = agent
        .root()
        .join("images/layers")
        .join(zstd_layer)
        .join("zstd/hello");
    assert_eq!(std::fs::read_to_string(p).unwrap(), "zstd\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_errors_map_to_grpc_codes() {
    let reg = Registry::start().expect("registry");
    let private = Registry::start_with_auth("isola", "s3cret").expect("auth registry");
    let secret = private
        .push_image("priv/img", "1", &arch_image("amd64"))
        .unwrap();
    let good = Tar::new().file("ok", b"ok\n", 0o644).finish();
    let evil = Tar::new().file("../../escape-e2e", b"x\n", 0o644).finish();
    let hostile = reg
        .push_image(
            "e2e/evil",
            "1",
            &ImageSpec::new(vec![(good, Compression::Gzip), (evil, Compression::Gzip)]),
        )
        .unwrap();
    let corrupt = reg
        .push_image("e2e/corrupt", "1", &arch_image("amd64"))
        .unwrap();
    reg.corrupt_blob(&corrupt.layer_digests[0]).unwrap();
    let agent = agent_for(&[&reg, &private]).await;
    let mut images = agent.images().await;

    let code = |r: Result<String, tonic::Status>| r.expect_err("must fail").code();
    assert_eq!(
        code(pull(&mut images, "", None).await),
        Code::InvalidArgument
    );
    let bad = pull(&mut images, "UPPER/Case:x", None).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("UPPER/Case:x"), "{}", bad.message());
    assert_eq!(
        code(pull(&mut images, &reg.image("e2e/none", "1"), None).await),
        Code::NotFound
    );
    // Basic auth: without, with wrong, with right credentials (both CRI forms).
    assert_eq!(
        code(pull(&mut images, &secret.reference, None).await),
        Code::Unauthenticated
    );
    let wrong = cri::AuthConfig {
        username: "isola".into(),
        password: "nope".into(),
        ..Default::default()
    };
    assert_eq!(
        code(pull(&mut images, &secret.reference, Some(wrong)).await),
        Code::Unauthenticated
    );
    let right = cri::AuthConfig {
        username: "isola".into(),
        password: "s3cret".into(),
        ..Default::default()
    };
    let id = pull(&mut images, &secret.reference, Some(right))
        .await
        .expect("authorised pull");
    assert_eq!(id, secret.config_digest);
    remove(&mut images, &id).await.unwrap();
    let auth_field = cri::AuthConfig {
        auth: "aXNvbGE6czNjcmV0".into(),
        ..Default::default()
    };
    pull(&mut images, &secret.reference, Some(auth_field))
        .await
        .expect("auth field pull");
    remove(&mut images, &id).await.unwrap();

    // Hostile layer and corrupt blob: refused, nothing kept.
    let err = pull(&mut images, &hostile.reference, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("../../escape-e2e"),
        "{}",
        err.message()
    );
    let err = pull(&mut images, &corrupt.reference, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(list(&mut images, None).await.is_empty());
    let store = agent.root().join("images");
    assert!(dir_entries(&store.join("tmp")).is_empty());
    assert!(!agent.root().join("escape-e2e").exists());
    // The good first layer of the hostile image and the corrupt image's config go too.
    let layers = store.join("layers");
    let blobs = store.join("blobs/sha256");
    assert!(
        eventually(std::time::Duration::from_secs(10), || {
            let (l, b) = (layers.clone(), blobs.clone());
            async move { dir_entries(&l).is_empty() && dir_entries(&b).is_empty() }
        })
        .await,
        "nothing of the failed pulls stays: {:?} {:?}",
        dir_entries(&layers),
        dir_entries(&blobs)
    );
}

/// Pull time of a ≥50 MB multi-layer image through the CRI socket. Run with
/// `cargo test -p isola-tests --release --test images -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn big_image_pull_time_over_cri() {
    let reg = Registry::start().expect("registry");
    let big = reg
        .push_image(
            "bench/big",
            "1",
            &isola_tests::registry::big_image(3, 20).unwrap(),
        )
        .unwrap();
    let agent = agent_for(&[&reg]).await;
    let mut images = agent.images().await;
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = std::time::Instant::now();
        pull(&mut images, &big.reference, None).await.expect("pull");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        remove(&mut images, &big.reference).await.expect("remove");
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "PullImage of a {}-layer {} MB image: min {:.0} ms, median {:.0} ms, max {:.0} ms",
        big.layer_digests.len(),
        60,
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    );
}
