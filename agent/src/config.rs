//! The agent's configuration: TOML, every key optional, embedded defaults.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid isolad configuration.
    #[error("parsing config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent.
    #[error("config: {0}")]
    Invalid(String),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// How pod and container cgroups are named and created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    /// Plain cgroupfs directories (kubelet's `--cgroup-driver=cgroupfs`).
    #[default]
    Cgroupfs,
    /// systemd slices and scopes (kubelet's `--cgroup-driver=systemd`).
    Systemd,
}

/// The whole configuration of `isolad`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Persistent data: records, images, snapshots.
    pub root: PathBuf,
    /// Runtime state: shim sockets, mounts, network namespaces.
    pub state: PathBuf,
    /// The CRI socket.
    pub socket: PathBuf,
    /// Group that owns the CRI socket (mode 0660); empty keeps root's group.
    pub socket_group: String,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or `isola_agent=debug`.
    pub log_level: String,
    /// The handler used when a pod names none.
    pub default_runtime_handler: String,
    /// Directory of `*.toml` runtime classes that override or add to the embedded ones.
    pub runtime_classes_dir: PathBuf,
    /// Directory holding the shim binaries; empty means next to `isolad`, then `$PATH`.
    pub shim_dir: PathBuf,
    /// `cgroupfs` or `systemd`.
    pub cgroup_driver: CgroupDriver,
    /// Seconds a shim may take to start listening.
    pub shim_start_timeout_seconds: u64,
    /// Seconds in-flight CRI calls get to finish after SIGTERM/SIGINT.
    pub shutdown_grace_seconds: u64,
    /// Registries: mirrors and plain-HTTP registries (`isola_images::RegistryConfig`).
    pub registry: isola_images::RegistryConfig,
    /// The exec/attach/port-forward streaming server.
    pub streaming: StreamingConfig,
    /// Pod networking through CNI plugins.
    pub cni: CniConfig,
}

/// Where CNI network configurations and plugins are found, and how plugins run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CniConfig {
    /// Directory of network configurations (`*.conflist`, then `*.conf` / `*.json`);
    /// the first valid one by file name is used.
    pub conf_dir: PathBuf,
    /// Directories searched, in order, for plugin binaries.
    pub bin_dirs: Vec<PathBuf>,
    /// Seconds one plugin invocation may take before it is killed.
    pub plugin_timeout_seconds: u64,
}

impl Default for CniConfig {
    fn default() -> Self {
        CniConfig {
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
            plugin_timeout_seconds: 60,
        }
    }
}

/// The streaming server that CRI Exec, Attach and PortForward hand out URLs of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamingConfig {
    /// `host:port` to listen on; port 0 picks a free port (the URLs carry the real one).
    pub address: String,
    /// Seconds a URL's single-use token stays valid.
    pub token_ttl_seconds: u64,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        StreamingConfig {
            address: "127.0.0.1:10350".into(),
            token_ttl_seconds: 60,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from("/var/lib/isola"),
            state: PathBuf::from("/run/isola"),
            socket: PathBuf::from("/run/isola/isola.sock"),
            socket_group: String::new(),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            default_runtime_handler: "native".into(),
            runtime_classes_dir: PathBuf::from("/etc/isola/runtime-classes"),
            shim_dir: PathBuf::new(),
            cgroup_driver: CgroupDriver::Cgroupfs,
            shim_start_timeout_seconds: 10,
            shutdown_grace_seconds: 10,
            registry: isola_images::RegistryConfig::default(),
            streaming: StreamingConfig::default(),
            cni: CniConfig::default(),
        }
    }
}

/// The default configuration as TOML, every key commented. `isolad config default` prints
/// it; a test checks it parses to [`Config::default`] and names every key.
pub const DEFAULT_CONFIG_TOML: &str = r#"# isolad configuration. Every key is optional; these are the defaults.
# Command-line flags (--root, --state, --socket, --log-format) override this file.

# Persistent data: pod/container records (redb), images, snapshots.
root = "/var/lib/isola"

# Runtime state: shim sockets, pod runtime directories, network namespace mounts.
state = "/run/isola"

# The CRI socket kubelet and crictl connect to (created with mode 0660).
socket = "/run/isola/isola.sock"

# Group that owns the CRI socket; empty keeps root's group.
socket_group = ""

# Log output: "text" or "json".
log_format = "text"

# A tracing filter directive: "info", "debug", "isola_agent=debug,info", ...
log_level = "info"

# The runtime handler used when a pod names none (an empty RuntimeClass handler).
default_runtime_handler = "native"

# Directory of *.toml runtime classes that override (same handler) or add to the
# embedded ones (native, vm). A missing directory is fine.
runtime_classes_dir = "/etc/isola/runtime-classes"

# Directory holding isola-shim-native and isola-shim-vm; empty: next to isolad, then $PATH.
shim_dir = ""

# Cgroup driver, as kubelet's --cgroup-driver: "cgroupfs" or "systemd".
cgroup_driver = "cgroupfs"

# Seconds a newly started shim may take to listen on its socket.
shim_start_timeout_seconds = 10

# Seconds in-flight CRI calls get to finish after SIGTERM/SIGINT.
shutdown_grace_seconds = 10

# Registries. `mirrors`: per registry host, mirror hosts tried in order before the
# registry itself, e.g. { "docker.io" = ["mirror.example:5000"] }. `insecure_registries`:
# hosts (host or host:port, mirrors included) spoken to over plain HTTP; none by default.
# `max_concurrent_downloads`: blobs one pull fetches at once (0: 3). In a file of your
# own you may write this as a [registry] table instead.
registry = { mirrors = {}, insecure_registries = [], max_concurrent_downloads = 0 }

# Pod networking (CNI). `conf_dir`: network configurations; the first valid one by file
# name (*.conflist, then *.conf and *.json) is used, re-read when it changes; while none
# is valid, NetworkReady is false and pods get a network namespace with only loopback.
# In a host-local `ranges` entry, `"subnet": "usePodCidr"` stands for the pod CIDR given
# by UpdateRuntimeConfig. `bin_dirs`: where plugin binaries are searched, in order.
# `plugin_timeout_seconds`: how long one plugin call may take before it is killed.
# In a file of your own you may write this as a [cni] table instead.
cni = { conf_dir = "/etc/cni/net.d", bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"], plugin_timeout_seconds = 60 }

# The exec/attach/port-forward streaming server: CRI Exec, Attach and PortForward answer
# with URLs on it. `address`: host:port to listen on (loopback: kubelet and crictl run
# on the node); port 0 picks a free port. `token_ttl_seconds`: how long a URL's
# single-use token stays valid. In a file of your own you may write this as a
# [streaming] table instead.
streaming = { address = "127.0.0.1:10350", token_ttl_seconds = 60 }
"#;

impl Config {
    /// Reads a configuration file; keys it leaves out keep their defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            source: Box::new(e),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, path) in [
            ("root", &self.root),
            ("state", &self.state),
            ("socket", &self.socket),
        ] {
            if !path.is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "{key} must be an absolute path, got {path:?}"
                )));
            }
        }
        if self.default_runtime_handler.is_empty() {
            return Err(ConfigError::Invalid(
                "default_runtime_handler must not be empty".into(),
            ));
        }
        if self.cni.plugin_timeout_seconds == 0 {
            return Err(ConfigError::Invalid(
                "cni.plugin_timeout_seconds must be at least 1".into(),
            ));
        }
        if self.streaming.token_ttl_seconds == 0 {
            return Err(ConfigError::Invalid(
                "streaming.token_ttl_seconds must be at least 1".into(),
            ));
        }
        if self
            .streaming
            .address
            .parse::<std::net::SocketAddr>()
            .is_err()
        {
            return Err(ConfigError::Invalid(format!(
                "streaming.address must be ip:port, got {:?}",
                self.streaming.address
            )));
        }
        if self.shim_start_timeout_seconds == 0 {
            return Err(ConfigError::Invalid(
                "shim_start_timeout_seconds must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Where the image store lives.
    pub fn images_root(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Where the records database lives.
    pub fn db_path(&self) -> PathBuf {
        self.root.join("isola.redb")
    }

    /// The shim socket of one pod: `<state>/s/<first 16 hex of the id>.sock`, short
    /// because a unix socket path may not exceed 107 bytes (containerd keeps its shim
    /// sockets in `/run/containerd/s/` for the same reason).
    pub fn shim_socket(&self, sandbox_id: &str) -> PathBuf {
        let short = &sandbox_id[..sandbox_id.len().min(16)];
        self.state.join("s").join(format!("{short}.sock"))
    }

    /// The runtime directory of one pod (shim socket, shim log, shim identity).
    pub fn pod_state_dir(&self, sandbox_id: &str) -> PathBuf {
        self.state.join("pods").join(sandbox_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_is_the_default_config() {
        let parsed = Config::parse(DEFAULT_CONFIG_TOML).expect("default config parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn default_toml_names_and_comments_every_key() {
        let value = toml::Value::try_from(Config::default()).expect("serialises");
        let table = value.as_table().expect("a table");
        let lines: Vec<&str> = DEFAULT_CONFIG_TOML.lines().collect();
        for key in table.keys() {
            let at = lines
                .iter()
                .position(|l| l.starts_with(&format!("{key} =")))
                .unwrap_or_else(|| panic!("key {key} missing from DEFAULT_CONFIG_TOML"));
            assert!(
                at > 0 && lines[at - 1].starts_with('#'),
                "key {key} has no comment above it"
            );
        }
    }

    #[test]
    fn deploy_config_is_the_default_config() {
        assert_eq!(
            include_str!("../../deploy/config.toml"),
            DEFAULT_CONFIG_TOML,
            "regenerate deploy/config.toml with `isolad config default`"
        );
    }

    #[test]
    fn unknown_keys_and_relative_paths_are_refused() {
        assert!(matches!(
            Config::parse("rooot = \"/x\""),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::parse("root = \"relative\""),
            Err(ConfigError::Invalid(_))
        ));
        let c = Config::parse("socket = \"/tmp/x.sock\"").expect("parses");
        assert_eq!(c.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.root, PathBuf::from("/var/lib/isola"));
    }
}
