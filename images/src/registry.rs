//! Talking to registries: credentials, manifest resolution (index → linux/amd64) and blob
//! downloads, over `oci-client` (which does the token dance and the HTTP).

use std::path::Path;

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::config::RegistryConfig;
use crate::error::{Error, IoContext, Result};
use crate::reference::{is_valid_digest, Reference};

/// Registry credentials, as in CRI's `AuthConfig` (`server_address` is not needed: the
/// credentials go to the registry of the image being pulled).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// User name for basic authentication (or for the token service).
    pub username: String,
    /// Password, with `username`.
    pub password: String,
    /// `base64(username:password)`, as in a Docker config file; used when `username` is
    /// empty.
    pub auth: String,
    /// An identity token (Docker's `identitytoken`): an OAuth2 refresh token, exchanged
    /// at the registry's token service (`POST`, `grant_type=refresh_token`) for an
    /// access token scoped to the repository being pulled.
    pub identity_token: String,
    /// A bearer token sent to the registry as it is.
    pub registry_token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("secrets", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// The `oci-client` form of these credentials.
    pub(crate) fn to_auth(&self) -> Result<RegistryAuth> {
        if !self.registry_token.is_empty() {
            return Ok(RegistryAuth::Bearer(self.registry_token.clone()));
        }
        if !self.username.is_empty() {
            return Ok(RegistryAuth::Basic(
                self.username.clone(),
                self.password.clone(),
            ));
        }
        if !self.auth.is_empty() {
            use base64::Engine as _;
            let bad = || Error::InvalidArgument("auth: not base64 of \"user:password\"".into());
            let raw = base64::engine::general_purpose::STANDARD
                .decode(self.auth.trim())
                .map_err(|_| bad())?;
            let s = String::from_utf8(raw).map_err(|_| bad())?;
            let (u, p) = s.split_once(':').ok_or_else(bad)?;
            return Ok(RegistryAuth::Basic(u.to_string(), p.to_string()));
        }
        // An identity token is exchanged per registry by `Fetcher::connect`.
        Ok(RegistryAuth::Anonymous)
    }
}

/// A blob to fetch, as a manifest names it.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
pub(crate) struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnyManifest {
    schema_version: Option<i64>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

const ACCEPTED: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// An image manifest resolved for linux/amd64.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    /// Digest of what the reference names (the index, if it is one): the repo digest.
    pub top_digest: String,
    /// Digest of the linux/amd64 image manifest.
    pub manifest_digest: String,
    /// The image config blob.
    pub config: Descriptor,
    /// Layer blobs, lowest first.
    pub layers: Vec<Descriptor>,
}

/// One registry endpoint with the credentials of one pull.
pub(crate) struct Fetcher {
    client: oci_client::Client,
    auth: RegistryAuth,
    oci_ref: oci_client::Reference,
    /// The reference being pulled, for errors.
    shown: String,
}

impl Fetcher {
    /// A fetcher for `reference`, talking to `endpoint` (the registry or one of its mirrors).
    /// A fetcher for `reference` at `endpoint` with the pull's credentials: an identity
    /// token is exchanged for an access token first.
    pub(crate) async fn connect(
        config: &RegistryConfig,
        reference: &Reference,
        endpoint: &str,
        creds: &Credentials,
    ) -> Result<Fetcher> {
        let mut f = Fetcher::new(config, reference, endpoint, creds.to_auth()?);
        let only_identity = creds.registry_token.is_empty()
            && creds.username.is_empty()
            && creds.auth.is_empty()
            && !creds.identity_token.is_empty();
        if only_identity {
            let plain_http = config.insecure_registries.iter().any(|h| h == endpoint);
            if let Some(token) = f
                .exchange_refresh_token(&creds.identity_token, plain_http)
                .await?
            {
                f.auth = RegistryAuth::Bearer(token);
            }
        }
        Ok(f)
    }

    /// Trades an OAuth2 refresh token for an access token at the token service the
    /// registry names in its `WWW-Authenticate` challenge; `None` if the registry asks
    /// for no token.
    async fn exchange_refresh_token(
        &self,
        refresh: &str,
        plain_http: bool,
    ) -> Result<Option<String>> {
        let unavailable = |e: reqwest::Error| Error::Unavailable {
            reference: self.shown.clone(),
            detail: e.to_string(),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(15))
            .timeout(std::time::Duration::from_secs(60))
            .user_agent(concat!("isola/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(unavailable)?;
        let scheme = if plain_http { "http" } else { "https" };
        let registry = self.oci_ref.resolve_registry();
        let resp = http
            .get(format!("{scheme}://{registry}/v2/"))
            .send()
            .await
            .map_err(unavailable)?;
        let challenge = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(parse_bearer_challenge);
        let Some(Some(params)) = challenge else {
            return Ok(None);
        };
        let Some(realm) = params
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
        else {
            return Ok(None);
        };
        let service = params
            .iter()
            .find(|(k, _)| k == "service")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let scope = format!("repository:{}:pull", self.oci_ref.repository());
        let form = format!(
            "grant_type=refresh_token&client_id=isola&service={}&scope={}&refresh_token={}",
            form_encode(&service),
            form_encode(&scope),
            form_encode(refresh)
        );
        let resp = http
            .post(&realm)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form)
            .send()
            .await
            .map_err(unavailable)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(unavailable)?;
        if status == reqwest::StatusCode::UNAUTHORIZED
            || status == reqwest::StatusCode::FORBIDDEN
            || status == reqwest::StatusCode::BAD_REQUEST
        {
            return Err(Error::Unauthenticated {
                reference: self.shown.clone(),
                detail: format!("the token service refused the identity token (HTTP {status})"),
            });
        }
        if !status.is_success() {
            return Err(Error::Unavailable {
                reference: self.shown.clone(),
                detail: format!("token service {realm}: HTTP {status}"),
            });
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            #[serde(default)]
            access_token: Option<String>,
            #[serde(default)]
            token: Option<String>,
        }
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| Error::Unavailable {
            reference: self.shown.clone(),
            detail: format!("token service answer: {e}"),
        })?;
        match t.access_token.or(t.token) {
            Some(tok) if !tok.is_empty() => Ok(Some(tok)),
            _ => Err(Error::Unavailable {
                reference: self.shown.clone(),
                detail: "token service answered no token".into(),
            }),
        }
    }

    pub(crate) fn new(
        config: &RegistryConfig,
        reference: &Reference,
        endpoint: &str,
        auth: RegistryAuth,
    ) -> Fetcher {
        install_crypto_provider();
        let client_config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(config.insecure_registries.clone()),
            platform_resolver: None,
            connect_timeout: Some(std::time::Duration::from_secs(15)),
            read_timeout: Some(std::time::Duration::from_secs(120)),
            user_agent: concat!("isola/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        // Docker Hub's API lives at registry-1.docker.io; oci-client maps docker.io there.
        let oci_ref = match (&reference.digest, &reference.tag) {
            (Some(d), _) => oci_client::Reference::with_digest(
                endpoint.to_string(),
                reference.path.clone(),
                d.clone(),
            ),
            (None, tag) => oci_client::Reference::with_tag(
                endpoint.to_string(),
                reference.path.clone(),
                tag.clone()
                    .unwrap_or_else(|| crate::reference::DEFAULT_TAG.to_string()),
            ),
        };
        Fetcher {
            client: oci_client::Client::new(client_config),
            auth,
            oci_ref,
            shown: reference.to_string(),
        }
    }

    /// Fetches the manifest the reference names and, for an index, the linux/amd64 image
    /// manifest in it.
    pub(crate) async fn resolve(&self) -> Result<Resolved> {
        let (body, digest) = self
            .client
            .pull_manifest_raw(&self.oci_ref, &self.auth, ACCEPTED)
            .await
            .map_err(|e| self.map_err(e))?;
        let top_digest = sha256_digest(&body);
        if let Some(pinned) = self.oci_ref.digest() {
            if pinned != top_digest {
                return Err(Error::Verification {
                    digest: pinned.to_string(),
                    detail: format!("manifest hashes to {top_digest}"),
                });
            }
        }
        if digest != top_digest {
            tracing::debug!(header = %digest, computed = %top_digest, "registry digest header differs from content");
        }
        let m = self.parse(&body)?;
        let mut manifest_digest = top_digest.clone();
        let (config, layers) = if let Some(entries) = m.manifests {
            let pick = pick_linux_amd64(&entries).ok_or_else(|| Error::Unsupported {
                reference: self.shown.clone(),
                detail: "the image index has no linux/amd64 manifest".into(),
            })?;
            let by_digest = self.oci_ref.clone_with_digest(pick.digest.clone());
            let (body, _) = self
                .client
                .pull_manifest_raw(&by_digest, &self.auth, ACCEPTED)
                .await
                .map_err(|e| self.map_err(e))?;
            verify_bytes(&body, &pick.digest, pick.size)?;
            manifest_digest = pick.digest.clone();
            let m = self.parse(&body)?;
            if m.manifests.is_some() {
                return Err(Error::Unsupported {
                    reference: self.shown.clone(),
                    detail: "nested image index".into(),
                });
            }
            self.image_parts(m)?
        } else {
            self.image_parts(m)?
        };
        Ok(Resolved {
            top_digest,
            manifest_digest,
            config,
            layers,
        })
    }

    fn parse(&self, body: &[u8]) -> Result<AnyManifest> {
        let m: AnyManifest = serde_json::from_slice(body).map_err(|e| Error::Unsupported {
            reference: self.shown.clone(),
            detail: format!("manifest is not valid JSON: {e}"),
        })?;
        if m.schema_version != Some(2) {
            return Err(Error::Unsupported {
                reference: self.shown.clone(),
                detail: format!(
                    "manifest schema version {:?} (only 2 is supported)",
                    m.schema_version
                ),
            });
        }
        if let Some(mt) = &m.media_type {
            if !ACCEPTED.contains(&mt.as_str()) {
                return Err(Error::Unsupported {
                    reference: self.shown.clone(),
                    detail: format!("manifest media type {mt}"),
                });
            }
        }
        Ok(m)
    }

    fn image_parts(&self, m: AnyManifest) -> Result<(Descriptor, Vec<Descriptor>)> {
        let unsupported = |detail: String| Error::Unsupported {
            reference: self.shown.clone(),
            detail,
        };
        let config = m
            .config
            .ok_or_else(|| unsupported("manifest has no config".into()))?;
        let layers = m.layers.unwrap_or_default();
        for d in std::iter::once(&config).chain(layers.iter()) {
            if !is_valid_digest(&d.digest) {
                return Err(unsupported(format!(
                    "digest {:?} (only sha256 is supported)",
                    d.digest
                )));
            }
            if d.size < 0 {
                return Err(unsupported(format!("negative size for {}", d.digest)));
            }
        }
        for l in &layers {
            let mt = l.media_type.as_str();
            let known = mt.is_empty()
                || mt.starts_with("application/vnd.oci.image.layer.v1.tar")
                || mt.starts_with("application/vnd.docker.image.rootfs.diff.tar");
            if !known || mt.contains("nondistributable") || mt.contains("foreign") {
                return Err(unsupported(format!("layer media type {mt}")));
            }
        }
        Ok((config, layers))
    }

    /// Downloads one blob to `dest` (a temporary path), checking its size while it
    /// streams and its digest at the end. On error `dest` may hold a partial file; the
    /// caller removes it.
    pub(crate) async fn download(&self, desc: &Descriptor, dest: &Path) -> Result<()> {
        let oci_desc = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: desc.size,
            ..OciDescriptor::default()
        };
        let mut stream = self
            .client
            .pull_blob_stream(&self.oci_ref, &oci_desc)
            .await
            .map_err(|e| self.map_err(e))?;
        let mut file = tokio::fs::File::create(dest)
            .await
            .ctx(|| format!("create {}", dest.display()))?;
        let mut hasher = Sha256::new();
        let mut written: u64 = 0;
        let want = desc.size as u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                // oci-client's verifying stream reports a digest mismatch as an I/O error.
                let s = e.to_string();
                if s.to_lowercase().contains("digest") {
                    Error::Verification {
                        digest: desc.digest.clone(),
                        detail: s,
                    }
                } else {
                    Error::Unavailable {
                        reference: self.shown.clone(),
                        detail: format!("reading blob {}: {s}", desc.digest),
                    }
                }
            })?;
            written += chunk.len() as u64;
            if written > want {
                return Err(Error::Verification {
                    digest: desc.digest.clone(),
                    detail: format!("blob is larger than the {want} bytes the manifest says"),
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .ctx(|| format!("write {}", dest.display()))?;
        }
        if written != want {
            return Err(Error::Verification {
                digest: desc.digest.clone(),
                detail: format!("blob has {written} bytes, the manifest says {want}"),
            });
        }
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        if got != desc.digest {
            return Err(Error::Verification {
                digest: desc.digest.clone(),
                detail: format!("content hashes to {got}"),
            });
        }
        file.sync_all()
            .await
            .ctx(|| format!("sync {}", dest.display()))?;
        Ok(())
    }

    fn map_err(&self, e: OciDistributionError) -> Error {
        let reference = self.shown.clone();
        let detail = e.to_string();
        match &e {
            OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::UnauthorizedError { .. } => {
                Error::Unauthenticated { reference, detail }
            }
            OciDistributionError::ServerError { code: 401, .. } => {
                Error::Unauthenticated { reference, detail }
            }
            OciDistributionError::ServerError { code: 403, .. } => {
                Error::PermissionDenied { reference, detail }
            }
            OciDistributionError::ServerError { code: 404, .. }
            | OciDistributionError::ImageManifestNotFoundError(_) => {
                Error::NotFound(format!("{reference}: {detail}"))
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized))
                {
                    Error::Unauthenticated { reference, detail }
                } else if codes.iter().any(|c| matches!(c, OciErrorCode::Denied)) {
                    Error::PermissionDenied { reference, detail }
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    Error::NotFound(format!("{reference}: {detail}"))
                } else {
                    Error::Unavailable { reference, detail }
                }
            }
            OciDistributionError::DigestError(_) => Error::Verification {
                digest: reference,
                detail,
            },
            OciDistributionError::ManifestParsingError(_)
            | OciDistributionError::VersionedParsingError(_)
            | OciDistributionError::UnsupportedMediaTypeError(_)
            | OciDistributionError::UnsupportedSchemaVersionError(_) => {
                Error::Unsupported { reference, detail }
            }
            _ => Error::Unavailable { reference, detail },
        }
    }
}

/// The parameters of a `Bearer k="v", ...` challenge; `None` for another scheme.
fn parse_bearer_challenge(h: &str) -> Option<Vec<(String, String)>> {
    let rest = h.trim();
    let (scheme, rest) = rest.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut out = Vec::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            match after.find(',') {
                Some(i) => (&after[..i], &after[i..]),
                None => (after, ""),
            }
        };
        out.push((k.trim().to_ascii_lowercase(), v.to_string()));
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(out)
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The linux/amd64 entry of an index; an entry without a variant (or `v1`) wins over a
/// later one.
fn pick_linux_amd64(entries: &[Descriptor]) -> Option<&Descriptor> {
    let mut candidates = entries.iter().filter(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    let first = candidates.next()?;
    let plain = |d: &&Descriptor| {
        d.platform
            .as_ref()
            .is_some_and(|p| matches!(p.variant.as_deref(), None | Some("") | Some("v1")))
    };
    if plain(&first) {
        return Some(first);
    }
    candidates.find(plain).or(Some(first))
}

/// `sha256:<hex>` of some bytes.
pub(crate) fn sha256_digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Checks bytes against a descriptor's digest and size.
pub(crate) fn verify_bytes(b: &[u8], digest: &str, size: i64) -> Result<()> {
    if b.len() as i64 != size {
        return Err(Error::Verification {
            digest: digest.to_string(),
            detail: format!("{} bytes, the descriptor says {size}", b.len()),
        });
    }
    let got = sha256_digest(b);
    if got != digest {
        return Err(Error::Verification {
            digest: digest.to_string(),
            detail: format!("content hashes to {got}"),
        });
    }
    Ok(())
}

/// rustls needs a process-wide crypto provider; ring is ours (it builds without cmake).
/// Installing fails harmlessly when one is already there.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(arch: &str, variant: Option<&str>, d: &str) -> Descriptor {
        Descriptor {
            media_type: String::new(),
            digest: d.into(),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.map(Into::into),
            }),
        }
    }

    #[test]
    fn index_resolves_to_linux_amd64() {
        let e = vec![
            entry("arm64", Some("v8"), "a"),
            entry("amd64", Some("v3"), "b"),
            entry("amd64", None, "c"),
        ];
        assert_eq!(pick_linux_amd64(&e).unwrap().digest, "c");
        assert_eq!(pick_linux_amd64(&e[..2]).unwrap().digest, "b");
        assert!(pick_linux_amd64(&e[..1]).is_none());
    }

    #[test]
    fn credentials_forms() {
        let c = Credentials {
            auth: "dXNlcjpwYXNz".into(),
            ..Default::default()
        };
        assert_eq!(
            c.to_auth().unwrap(),
            RegistryAuth::Basic("user".into(), "pass".into())
        );
        let c = Credentials {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        assert_eq!(
            c.to_auth().unwrap(),
            RegistryAuth::Basic("u".into(), "p".into())
        );
        let c = Credentials {
            registry_token: "t".into(),
            ..Default::default()
        };
        assert_eq!(c.to_auth().unwrap(), RegistryAuth::Bearer("t".into()));
        assert_eq!(
            Credentials::default().to_auth().unwrap(),
            RegistryAuth::Anonymous
        );
        let bad = Credentials {
            auth: "!!!".into(),
            ..Default::default()
        };
        assert!(matches!(bad.to_auth(), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn bearer_challenges_parse() {
        let p = parse_bearer_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        )
        .unwrap();
        assert_eq!(
            p[0],
            ("realm".into(), "https://auth.docker.io/token".into())
        );
        assert_eq!(p[1], ("service".into(), "registry.docker.io".into()));
        assert_eq!(p[2].1, "repository:library/busybox:pull");
        assert!(parse_bearer_challenge(r#"Basic realm="x""#).is_none());
        assert_eq!(form_encode("a b/c:d"), "a%20b%2Fc%3Ad");
    }

    #[test]
    fn verify_bytes_checks_size_and_digest() {
        let d = sha256_digest(b"abc");
        verify_bytes(b"abc", &d, 3).unwrap();
        assert!(verify_bytes(b"abc", &d, 4).is_err());
        assert!(verify_bytes(b"abd", &d, 3).is_err());
    }
}
