//! Registry settings, embedded by the agent in its TOML configuration.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How isola reaches registries. Embedded in the agent's config file (e.g. as
/// `[images.registry]`); every field has a default, so an empty table is valid.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Mirrors per registry host: `{ "docker.io" = ["mirror.example:5000"] }`. A pull of an
    /// image on that registry tries each mirror host in order (same repository path), and
    /// the registry itself last. Names are registry hosts as in image references
    /// (`docker.io`, `quay.io`, `host:port`). Empty by default.
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// Registry hosts (`host` or `host:port`, as written in image references, mirrors
    /// included) spoken to over plain HTTP instead of HTTPS. None by default: plain HTTP
    /// lets anyone on the path swap the manifest, so list only registries you trust the
    /// network to.
    pub insecure_registries: Vec<String>,
    /// How many blobs one pull downloads at once. 0 means the default (3).
    pub max_concurrent_downloads: usize,
}

impl RegistryConfig {
    /// The download concurrency to use.
    pub fn concurrency(&self) -> usize {
        if self.max_concurrent_downloads == 0 {
            3
        } else {
            self.max_concurrent_downloads
        }
    }

    /// The hosts to try, in order, for an image on `domain`: its mirrors, then itself.
    pub fn endpoints(&self, domain: &str) -> Vec<String> {
        let mut v: Vec<String> = self.mirrors.get(domain).cloned().unwrap_or_default();
        v.push(domain.to_string());
        v
    }
}
