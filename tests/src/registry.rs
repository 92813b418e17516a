//! A real OCI registry for tests: Debian's `docker-registry` (distribution 2.8) on
//! 127.0.0.1 on a free port, storage in a temporary directory, optionally behind basic
//! auth (htpasswd, bcrypt), plus builders for the images the tests pull, made from
//! Debian's `busybox-static`.
//!
//! Needs the Debian packages `docker-registry`, `busybox-static` and `apache2-utils`
//! (for `htpasswd`). Blobs are pushed with the registry's HTTP API (monolithic upload:
//! `POST /v2/<name>/blobs/uploads/`, then `PUT <location>?digest=`), manifests with
//! `PUT /v2/<name>/manifests/<ref>`, over a plain HTTP/1.1 connection to 127.0.0.1.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest as _, Sha256};

/// OCI media types used by the fixtures.
pub mod media {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// Docker schema 2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
}

/// A running registry; stopped and its storage removed when dropped.
pub struct Registry {
    /// `127.0.0.1:<port>`, the host part of image references.
    pub addr: String,
    /// Basic-auth user and password, when the registry wants them.
    pub auth: Option<(String, String)>,
    /// A bearer token with push rights, when the registry wants tokens.
    bearer: Option<String>,
    token_server: Option<TokenServer>,
    storage: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        drop(self.token_server.take());
    }
}

const TOKEN_SERVICE: &str = "isola-registry";
const TOKEN_ISSUER: &str = "isola-test";

/// A token service for [`Registry::start_with_token_auth`]: tokens are JWTs signed
/// (RS256, with `openssl`) by a self-signed certificate the registry trusts, carrying the
/// certificate in their `x5c` header. Tokens are made once at start, one per kind of
/// caller.
struct TokenServer {
    addr: String,
    cert: PathBuf,
    push_token: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl TokenServer {
    fn start(public: &[&str], private: &[&str], refresh_token: &str) -> Result<TokenServer> {
        let dir = tempfile::Builder::new().prefix("isola-token").tempdir()?;
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=isola-test-token"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .context("openssl (apt-get install openssl)")?;
        if !out.status.success() {
            bail!("openssl req: {}", String::from_utf8_lossy(&out.stderr));
        }
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()?;
        if !der.status.success() {
            bail!("openssl x509: {}", String::from_utf8_lossy(&der.stderr));
        }
        let sign = |repos: &[&str], actions: &[&str]| -> Result<String> {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let std_b64 = base64::engine::general_purpose::STANDARD;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            let header = serde_json::json!({
                "typ": "JWT",
                "alg": "RS256",
                "x5c": [std_b64.encode(&der.stdout)],
            });
            let access: Vec<serde_json::Value> = repos
                .iter()
                .map(|r| serde_json::json!({ "type": "repository", "name": r, "actions": actions }))
                .collect();
            let claims = serde_json::json!({
                "iss": TOKEN_ISSUER,
                "sub": "isola-test",
                "aud": TOKEN_SERVICE,
                "exp": now + 7200,
                "nbf": now - 60,
                "iat": now - 60,
                "jti": format!("{now}-{}", std::process::id()),
                "access": access,
            });
            let signing_input = format!(
                "{}.{}",
                b64.encode(serde_json::to_vec(&header)?),
                b64.encode(serde_json::to_vec(&claims)?)
            );
            let mut child = Command::new("openssl")
                .args(["dgst", "-sha256", "-sign"])
                .arg(&key)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            child
                .stdin
                .take()
                .ok_or_else(|| anyhow!("openssl stdin"))?
                .write_all(signing_input.as_bytes())?;
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!("openssl dgst failed");
            }
            Ok(format!("{signing_input}.{}", b64.encode(out.stdout)))
        };
        let all: Vec<&str> = public.iter().chain(private.iter()).copied().collect();
        let push_token = sign(&all, &["pull", "push"])?;
        let anonymous = sign(public, &["pull"])?;
        let refreshed = sign(&all, &["pull"])?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let refresh_token = refresh_token.to_string();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = serve_token(&mut conn, &anonymous, &refreshed, &refresh_token);
            }
        });
        Ok(TokenServer {
            addr,
            cert,
            push_token,
            stop,
            thread: Some(thread),
            _dir: dir,
        })
    }
}

/// Answers one token request: GET (anonymous) or POST with a refresh token.
fn serve_token(
    conn: &mut TcpStream,
    anonymous: &str,
    refreshed: &str,
    refresh_token: &str,
) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            bail!("closed");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
    let (status, json) = if head.starts_with("POST ") {
        let form: Vec<(&str, &str)> = body
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let get = |k: &str| form.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        if get("grant_type") == Some("refresh_token") && get("refresh_token") == Some(refresh_token)
        {
            (
                "200 OK",
                serde_json::json!({ "access_token": refreshed, "expires_in": 3600 }),
            )
        } else {
            (
                "401 Unauthorized",
                serde_json::json!({ "error": "invalid_grant" }),
            )
        }
    } else {
        (
            "200 OK",
            serde_json::json!({ "token": anonymous, "expires_in": 3600 }),
        )
    };
    let body = json.to_string();
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

impl Registry {
    /// Starts an anonymous registry on a free port.
    pub fn start() -> Result<Registry> {
        Self::start_inner(None, None, None)
    }

    /// Starts an anonymous registry on `addr` (`127.0.0.1:<port>`), for a runtime
    /// configured beforehand to reach it (the benchmark).
    pub fn start_on(addr: &str) -> Result<Registry> {
        Self::start_inner(None, Some(addr.to_string()), None)
    }

    /// Starts a registry that wants `user`/`password` (HTTP basic auth) for everything.
    pub fn start_with_auth(user: &str, password: &str) -> Result<Registry> {
        Self::start_inner(Some((user.to_string(), password.to_string())), None, None)
    }

    /// Starts a registry behind a token service (as Docker Hub is): every request needs
    /// a bearer token from `http://127.0.0.1:<port>/token`. Anonymous token requests get
    /// pull rights on the `public` repositories only; an OAuth2 refresh-token request
    /// (`POST`, `grant_type=refresh_token`) with `refresh_token` gets pull rights on
    /// `public` and `private`.
    pub fn start_with_token_auth(
        public: &[&str],
        private: &[&str],
        refresh_token: &str,
    ) -> Result<Registry> {
        let server = TokenServer::start(public, private, refresh_token)?;
        Self::start_inner(None, None, Some(server))
    }

    fn start_inner(
        auth: Option<(String, String)>,
        addr: Option<String>,
        token_server: Option<TokenServer>,
    ) -> Result<Registry> {
        let bin = which("docker-registry").context(
            "docker-registry not found: apt-get install docker-registry busybox-static apache2-utils",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("isola-registry")
            .tempdir()?;
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage)?;
        // A free port: bind, read it, release. A race with another process is possible
        // but harmless: the start check below fails loudly.
        let addr = match addr {
            Some(a) => a,
            None => {
                let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
                format!("127.0.0.1:{port}")
            }
        };
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            storage.display()
        );
        if let Some((user, password)) = &auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .context("htpasswd (apt-get install apache2-utils)")?;
            if !out.status.success() {
                bail!("htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, &out.stdout)?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: isola-test\n    path: {}\n",
                path.display()
            ));
        }
        if let Some(ts) = &token_server {
            config.push_str(&format!(
                "auth:\n  token:\n    realm: http://{}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                ts.addr,
                ts.cert.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start docker-registry")?;
        let bearer = token_server.as_ref().map(|t| t.push_token.clone());
        let mut reg = Registry {
            addr,
            auth,
            bearer,
            token_server,
            storage,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = reg.child.try_wait()? {
                let log = std::fs::read_to_string(reg._dir.path().join("registry.log"))
                    .unwrap_or_default();
                bail!("docker-registry exited ({status}): {log}");
            }
            if let Ok(resp) = reg.request("GET", "/v2/", &[], &[]) {
                if resp.status == 200 || resp.status == 401 {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("docker-registry did not answer on {} within 20 s", reg.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(reg)
    }

    /// How many times a blob was fetched (`GET /v2/<repo>/blobs/<digest>`) so far,
    /// from the registry's access log.
    pub fn blob_gets(&self, repo: &str, digest: &str) -> usize {
        let log =
            std::fs::read_to_string(self._dir.path().join("registry.log")).unwrap_or_default();
        let needle = format!("GET /v2/{repo}/blobs/{digest}");
        log.lines().filter(|l| l.contains(&needle)).count()
    }

    /// `127.0.0.1:<port>/<repo>:<tag>`.
    pub fn image(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.addr)
    }

    /// Uploads a blob into `repo` and returns its digest.
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> Result<String> {
        let digest = sha256(data);
        let resp = self.request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], &[])?;
        if resp.status != 202 {
            bail!(
                "start upload to {repo}: HTTP {} {}",
                resp.status,
                resp.body_text()
            );
        }
        let location = resp
            .header("location")
            .ok_or_else(|| anyhow!("upload without Location"))?;
        // The location may be absolute (http://host/...) or a path.
        let path = match location.find("/v2/") {
            Some(i) => location[i..].to_string(),
            None => bail!("odd upload location {location}"),
        };
        let sep = if path.contains('?') { '&' } else { '?' };
        let resp = self.request(
            "PUT",
            &format!("{path}{sep}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            data,
        )?;
        if resp.status != 201 {
            bail!(
                "upload {digest} to {repo}: HTTP {} {}",
                resp.status,
                resp.body_text()
            );
        }
        Ok(digest)
    }

    /// Puts a manifest (or index) under `reference` (a tag or a digest) and returns the
    /// manifest's digest.
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Result<String> {
        let resp = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Content-Type", media_type)],
            body,
        )?;
        if resp.status != 201 {
            bail!(
                "put manifest {repo}:{reference}: HTTP {} {}",
                resp.status,
                resp.body_text()
            );
        }
        Ok(sha256(body))
    }

    /// Builds and pushes an image as `repo:tag`.
    pub fn push_image(&self, repo: &str, tag: &str, image: &ImageSpec) -> Result<PushedImage> {
        let built = image.build()?;
        for (blob, _) in &built.layers {
            self.push_blob(repo, blob)?;
        }
        self.push_blob(repo, &built.config)?;
        let manifest_digest =
            self.push_manifest(repo, tag, image.manifest_media_type(), &built.manifest)?;
        Ok(PushedImage {
            reference: self.image(repo, tag),
            manifest_digest,
            manifest_size: built.manifest.len(),
            config_digest: sha256(&built.config),
            layer_digests: built.layers.iter().map(|(b, _)| sha256(b)).collect(),
            diff_ids: built.layers.iter().map(|(_, d)| d.clone()).collect(),
            manifest_media_type: image.manifest_media_type().to_string(),
        })
    }

    /// Pushes an index of already pushed images (each as `(image, os, arch)`) as
    /// `repo:tag`; the images must have been pushed to `repo`.
    pub fn push_index(
        &self,
        repo: &str,
        tag: &str,
        entries: &[(&PushedImage, &str, &str)],
        docker: bool,
    ) -> Result<String> {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(img, os, arch)| {
                serde_json::json!({
                    "mediaType": img.manifest_media_type,
                    "digest": img.manifest_digest,
                    "size": img.manifest_size,
                    "platform": { "architecture": arch, "os": os },
                })
            })
            .collect();
        let media_type = if docker {
            media::DOCKER_LIST
        } else {
            media::OCI_INDEX
        };
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": manifests,
        });
        let body = serde_json::to_vec(&index)?;
        self.push_manifest(repo, tag, media_type, &body)
    }

    /// Overwrites a stored blob's bytes in the registry's storage, keeping its length,
    /// so the registry serves content that does not match its digest.
    pub fn corrupt_blob(&self, digest: &str) -> Result<()> {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        let path = self
            .storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        let mut data = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
        std::fs::write(&path, data)?;
        Ok(())
    }

    /// A raw HTTP/1.1 request to the registry (with its basic auth, if any).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response> {
        let mut s = TcpStream::connect(&self.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(t) = &self.bearer {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some((u, p)) = &self.auth {
            use base64::Engine as _;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            req.push_str(&format!("Authorization: Basic {token}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        s.write_all(body)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        Response::parse(&raw)
    }
}

/// An HTTP response from [`Registry::request`].
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body (chunked encoding undone).
    pub body: Vec<u8>,
}

impl Response {
    fn parse(raw: &[u8]) -> Result<Response> {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| anyhow!("no HTTP header end"))?;
        let head = std::str::from_utf8(&raw[..end])?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .ok_or_else(|| anyhow!("bad status line {status_line}"))?
            .parse()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[end + 4..].to_vec();
        if headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
        {
            body = dechunk(&body);
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// The first header of that (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&b[..i]).unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        if n == 0 || b.len() < i + 2 + n {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + n]);
        b = &b[(i + 4 + n).min(b.len())..];
    }
    out
}

/// What a pushed image is made of.
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// `127.0.0.1:<port>/<repo>:<tag>`.
    pub reference: String,
    /// Digest of the image manifest.
    pub manifest_digest: String,
    /// Size of the image manifest.
    pub manifest_size: usize,
    /// Digest of the config: the image id.
    pub config_digest: String,
    /// Digests of the (compressed) layer blobs.
    pub layer_digests: Vec<String>,
    /// Digests of the uncompressed layers.
    pub diff_ids: Vec<String>,
    /// The manifest's media type.
    pub manifest_media_type: String,
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `tar+gzip`.
    Gzip,
    /// `tar+zstd`.
    Zstd,
    /// Plain `tar`.
    None,
}

/// An image to build: layers (uncompressed tars) and the runtime config.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Layers, lowest first, each with its compression.
    pub layers: Vec<(Vec<u8>, Compression)>,
    /// The `config` object of the image config (Env, Cmd, User...).
    pub config: serde_json::Value,
    /// The architecture written into the image config.
    pub architecture: String,
    /// Docker schema 2 media types instead of OCI ones.
    pub docker: bool,
    /// When set, the manifest claims this size for the first layer instead of its real
    /// one (to test size verification).
    pub lie_about_first_layer_size: Option<i64>,
}

struct Built {
    layers: Vec<(Vec<u8>, String)>,
    config: Vec<u8>,
    manifest: Vec<u8>,
}

impl ImageSpec {
    /// An OCI linux/amd64 image of these layers with `Cmd: ["/bin/sh"]`.
    pub fn new(layers: Vec<(Vec<u8>, Compression)>) -> ImageSpec {
        ImageSpec {
            layers,
            config: serde_json::json!({ "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"] }),
            architecture: "amd64".into(),
            docker: false,
            lie_about_first_layer_size: None,
        }
    }

    fn manifest_media_type(&self) -> &'static str {
        if self.docker {
            media::DOCKER_MANIFEST
        } else {
            media::OCI_MANIFEST
        }
    }

    fn build(&self) -> Result<Built> {
        let mut layers = Vec::new();
        let mut descs = Vec::new();
        for (i, (tar, comp)) in self.layers.iter().enumerate() {
            let diff_id = sha256(tar);
            let (blob, mt) = match comp {
                Compression::Gzip => (
                    gzip(tar)?,
                    if self.docker {
                        "application/vnd.docker.image.rootfs.diff.tar.gzip"
                    } else {
                        "application/vnd.oci.image.layer.v1.tar+gzip"
                    },
                ),
                Compression::Zstd => (
                    zstd::encode_all(&tar[..], 3)?,
                    "application/vnd.oci.image.layer.v1.tar+zstd",
                ),
                Compression::None => (
                    tar.clone(),
                    if self.docker {
                        "application/vnd.docker.image.rootfs.diff.tar"
                    } else {
                        "application/vnd.oci.image.layer.v1.tar"
                    },
                ),
            };
            let size = match (i, self.lie_about_first_layer_size) {
                (0, Some(s)) => s,
                _ => blob.len() as i64,
            };
            descs.push(
                serde_json::json!({ "mediaType": mt, "digest": sha256(&blob), "size": size }),
            );
            layers.push((blob, diff_id));
        }
        let config = serde_json::json!({
            "architecture": self.architecture,
            "os": "linux",
            "config": self.config,
            "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>() },
            "history": [],
        });
        let config = serde_json::to_vec(&config)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": self.manifest_media_type(),
            "config": {
                "mediaType": if self.docker { media::DOCKER_CONFIG } else { media::OCI_CONFIG },
                "digest": sha256(&config),
                "size": config.len(),
            },
            "layers": descs,
        });
        Ok(Built {
            layers,
            config,
            manifest: serde_json::to_vec(&manifest)?,
        })
    }
}

/// `sha256:<hex>` of some bytes.
pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn gzip(b: &[u8]) -> Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b)?;
    Ok(e.finish()?)
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Debian's statically linked busybox.
pub fn busybox() -> Result<Vec<u8>> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(p).is_file() {
            return Ok(std::fs::read(p)?);
        }
    }
    bail!("busybox not found: apt-get install busybox-static")
}

/// A tar writer that writes headers itself (ustar, PAX for xattrs), so tests can make
/// any entry, including the hostile ones (`../x`) that `tar::Builder` refuses.
#[derive(Default)]
pub struct Tar {
    buf: Vec<u8>,
}

/// Modification time of every fixture entry.
pub const MTIME: u64 = 1_700_000_000;

impl Tar {
    /// An empty archive.
    pub fn new() -> Tar {
        Tar::default()
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        path: &str,
        kind: u8,
        data: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        link: &str,
        dev: (u32, u32),
    ) {
        let mut h = [0u8; 512];
        fn put(h: &mut [u8], at: usize, len: usize, v: &[u8]) {
            let n = v.len().min(len);
            h[at..at + n].copy_from_slice(&v[..n]);
        }
        fn octal(h: &mut [u8], at: usize, len: usize, v: u64) {
            let s = format!("{:0width$o}\0", v, width = len - 1);
            put(h, at, len, s.as_bytes());
        }
        assert!(
            path.len() <= 100 && link.len() <= 100,
            "fixture paths are short"
        );
        put(&mut h, 0, 100, path.as_bytes());
        octal(&mut h, 100, 8, mode as u64);
        octal(&mut h, 108, 8, uid as u64);
        octal(&mut h, 116, 8, gid as u64);
        octal(&mut h, 124, 12, data.len() as u64);
        octal(&mut h, 136, 12, MTIME);
        h[148..156].copy_from_slice(b"        ");
        h[156] = kind;
        put(&mut h, 157, 100, link.as_bytes());
        put(&mut h, 257, 6, b"ustar\0");
        put(&mut h, 263, 2, b"00");
        octal(&mut h, 329, 8, dev.0 as u64);
        octal(&mut h, 337, 8, dev.1 as u64);
        let sum: u32 = h.iter().map(|b| *b as u32).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        self.buf.extend_from_slice(&h);
        self.buf.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
    }

    /// A regular file, root-owned.
    pub fn file(mut self, path: &str, data: &[u8], mode: u32) -> Tar {
        self.entry(path, b'0', data, mode, 0, 0, "", (0, 0));
        self
    }

    /// A regular file with an owner.
    pub fn file_owned(mut self, path: &str, data: &[u8], mode: u32, uid: u32, gid: u32) -> Tar {
        self.entry(path, b'0', data, mode, uid, gid, "", (0, 0));
        self
    }

    /// A regular file with extended attributes (PAX `SCHILY.xattr.` records).
    pub fn file_xattrs(mut self, path: &str, data: &[u8], xattrs: &[(&str, &str)]) -> Tar {
        let mut records = Vec::new();
        for (k, v) in xattrs {
            let body = format!(" SCHILY.xattr.{k}={v}\n");
            // The length prefix counts itself.
            let mut len = body.len() + 1;
            while format!("{len}{body}").len() != len {
                len += 1;
            }
            records.extend_from_slice(format!("{len}{body}").as_bytes());
        }
        self.entry("PaxHeader", b'x', &records, 0o644, 0, 0, "", (0, 0));
        self.entry(path, b'0', data, 0o644, 0, 0, "", (0, 0));
        self
    }

    /// A directory.
    pub fn dir(mut self, path: &str, mode: u32) -> Tar {
        self.entry(path, b'5', &[], mode, 0, 0, "", (0, 0));
        self
    }

    /// A symlink `path -> target`.
    pub fn symlink(mut self, path: &str, target: &str) -> Tar {
        self.entry(path, b'2', &[], 0o777, 0, 0, target, (0, 0));
        self
    }

    /// A hard link `path` to the earlier entry `target`.
    pub fn hardlink(mut self, path: &str, target: &str) -> Tar {
        self.entry(path, b'1', &[], 0o644, 0, 0, target, (0, 0));
        self
    }

    /// A character device node.
    pub fn chardev(mut self, path: &str, major: u32, minor: u32) -> Tar {
        self.entry(path, b'3', &[], 0o666, 0, 0, "", (major, minor));
        self
    }

    /// A FIFO.
    pub fn fifo(mut self, path: &str) -> Tar {
        self.entry(path, b'6', &[], 0o644, 0, 0, "", (0, 0));
        self
    }

    /// The archive bytes, with the end-of-archive blocks.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend(std::iter::repeat_n(0u8, 1024));
        self.buf
    }
}

/// The standard multi-layer test image (`layered`), lowest layer first:
///
/// 1. gzip: `bin/busybox` (Debian's), `bin/sh -> busybox`, `etc/hostname` = "one",
///    `data/keep`, `data/remove`, `opq/a`, `opq/b`, `dev/testnull` (char 1:3),
///    `run/fifo`.
/// 2. gzip: whiteout of `data/remove`, `opq/` made opaque with a new `opq/c`,
///    `etc/hostname` = "two", hard link `etc/hostname-link` to it, symlink
///    `etc/motd -> hostname`, `bin/suid` (mode 4755, owner 1000:1000), `data/xattr` with
///    `user.isola=yes`.
/// 3. zstd: `zstd/hello` = "zstd".
/// 4. uncompressed: `plain/hello` = "plain".
pub fn layered_image() -> Result<ImageSpec> {
    let bb = busybox()?;
    let l1 = Tar::new()
        .dir("bin/", 0o755)
        .file("bin/busybox", &bb, 0o755)
        .symlink("bin/sh", "busybox")
        .dir("etc/", 0o755)
        .file("etc/hostname", b"one\n", 0o644)
        .dir("data/", 0o755)
        .file("data/keep", b"keep\n", 0o644)
        .file("data/remove", b"remove\n", 0o644)
        .dir("opq/", 0o755)
        .file("opq/a", b"a\n", 0o644)
        .file("opq/b", b"b\n", 0o644)
        .dir("dev/", 0o755)
        .chardev("dev/testnull", 1, 3)
        .dir("run/", 0o755)
        .fifo("run/fifo")
        .finish();
    let l2 = Tar::new()
        .file("data/.wh.remove", b"", 0o644)
        .dir("opq/", 0o755)
        .file("opq/.wh..wh..opq", b"", 0o644)
        .file("opq/c", b"c\n", 0o644)
        .file("etc/hostname", b"two\n", 0o644)
        .hardlink("etc/hostname-link", "etc/hostname")
        .symlink("etc/motd", "hostname")
        .file_owned("bin/suid", b"#!/bin/sh\n", 0o4755, 1000, 1000)
        .file_xattrs("data/xattr", b"x\n", &[("user.isola", "yes")])
        .finish();
    let l3 = Tar::new().file("zstd/hello", b"zstd\n", 0o644).finish();
    let l4 = Tar::new().file("plain/hello", b"plain\n", 0o644).finish();
    let mut spec = ImageSpec::new(vec![
        (l1, Compression::Gzip),
        (l2, Compression::Gzip),
        (l3, Compression::Zstd),
        (l4, Compression::None),
    ]);
    spec.config = serde_json::json!({
        "Env": ["PATH=/bin", "ISOLA=1"],
        "Cmd": ["/bin/sh"],
        "User": "1000:1000",
        "WorkingDir": "/data",
        "StopSignal": "SIGINT",
    });
    Ok(spec)
}

/// A one-layer image with a file `arch` holding `arch` (for index entries that are not
/// linux/amd64).
pub fn arch_image(arch: &str) -> ImageSpec {
    let l = Tar::new()
        .file("arch", format!("{arch}\n").as_bytes(), 0o644)
        .finish();
    let mut spec = ImageSpec::new(vec![(l, Compression::Gzip)]);
    spec.architecture = arch.into();
    spec
}

/// A big image for benchmarks: `layers` gzip layers of `mb_per_layer` MiB of random
/// (incompressible) bytes each, over a busybox layer.
pub fn big_image(layers: usize, mb_per_layer: usize) -> Result<ImageSpec> {
    let bb = busybox()?;
    let mut all = vec![(
        Tar::new()
            .dir("bin/", 0o755)
            .file("bin/busybox", &bb, 0o755)
            .symlink("bin/sh", "busybox")
            .finish(),
        Compression::Gzip,
    )];
    let mut urandom = std::fs::File::open("/dev/urandom")?;
    for i in 0..layers {
        let mut data = vec![0u8; mb_per_layer << 20];
        urandom.read_exact(&mut data)?;
        let tar = Tar::new()
            .dir("big/", 0o755)
            .file(&format!("big/blob{i}"), &data, 0o644)
            .finish();
        all.push((tar, Compression::Gzip));
    }
    Ok(ImageSpec::new(all))
}
