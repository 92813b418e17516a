//! Network configurations: finding the first valid one in the conf dir, checking that its
//! plugins exist, and filling in what the runtime knows (runtimeConfig capability args,
//! the pod CIDR).

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// Why a network configuration cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfError {
    /// The conf dir holds no configuration file at all.
    #[error("no network config found in {0}")]
    NoConfig(PathBuf),
    /// No file in the conf dir is usable; each file's problem is listed.
    #[error("no valid network config in {dir}: {}", .problems.join("; "))]
    NoValidConfig {
        /// The conf dir.
        dir: PathBuf,
        /// One line per file.
        problems: Vec<String>,
    },
    /// The config uses `usePodCidr` but no pod CIDR was set.
    #[error(
        "network {0} asks for the pod CIDR (usePodCidr) but UpdateRuntimeConfig has not set one"
    )]
    NoPodCidr(String),
}

/// A parsed network configuration list (a single `*.conf` is wrapped into one).
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfList {
    /// The file it came from.
    pub file: PathBuf,
    /// The list's `name`.
    pub name: String,
    /// The list's `cniVersion`.
    pub cni_version: String,
    /// The list as JSON (`name`, `cniVersion`, `plugins`, ...).
    pub raw: Value,
    /// The plugins' configs, in order.
    pub plugins: Vec<Value>,
}

impl NetConfList {
    /// Parses a `*.conflist` (or, with `single`, a `*.conf` holding one plugin).
    pub fn parse(file: &Path, text: &str, single: bool) -> Result<NetConfList, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let obj = v.as_object().ok_or("not a JSON object")?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or("no \"name\"")?
            .to_owned();
        let cni_version = obj
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("0.1.0")
            .to_owned();
        let (raw, plugins) = if single {
            if obj.get("type").and_then(Value::as_str).is_none() {
                return Err("no plugin \"type\"".into());
            }
            let mut plugin = obj.clone();
            plugin.remove("name");
            plugin.remove("cniVersion");
            let raw = json!({"cniVersion": cni_version, "name": name, "plugins": [plugin]});
            (raw, vec![Value::Object(plugin)])
        } else {
            let plugins = obj
                .get("plugins")
                .and_then(Value::as_array)
                .filter(|p| !p.is_empty())
                .ok_or("no \"plugins\" list")?
                .clone();
            for (i, p) in plugins.iter().enumerate() {
                if p.get("type")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    return Err(format!("plugins[{i}] has no \"type\""));
                }
            }
            (v.clone(), plugins)
        };
        if obj
            .get("disableCheck")
            .is_some_and(|d| d.as_bool().is_none())
        {
            return Err("\"disableCheck\" is not a boolean".into());
        }
        Ok(NetConfList {
            file: file.to_owned(),
            name,
            cni_version,
            raw,
            plugins,
        })
    }

    /// The plugin types, in order.
    pub fn types(&self) -> Vec<&str> {
        self.plugins
            .iter()
            .filter_map(|p| p.get("type").and_then(Value::as_str))
            .collect()
    }

    /// Whether any plugin's IPAM asks for the pod CIDR.
    pub fn uses_pod_cidr(&self) -> bool {
        self.raw.to_string().contains("usePodCidr")
    }

    /// The list with `usePodCidr` replaced by the pod CIDR(s) (comma-separated, as
    /// UpdateRuntimeConfig gives them): a host-local `ranges` entry `[{"subnet":
    /// "usePodCidr"}]` becomes one range set per CIDR; an IPAM `"subnet": "usePodCidr"`
    /// becomes the first CIDR.
    pub fn with_pod_cidr(&self, pod_cidr: Option<&str>) -> Result<NetConfList, ConfError> {
        if !self.uses_pod_cidr() {
            return Ok(self.clone());
        }
        let cidrs: Vec<&str> = pod_cidr
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        if cidrs.is_empty() {
            return Err(ConfError::NoPodCidr(self.name.clone()));
        }
        let mut out = self.clone();
        for p in &mut out.plugins {
            let Some(ipam) = p.get_mut("ipam").and_then(Value::as_object_mut) else {
                continue;
            };
            if ipam.get("subnet").and_then(Value::as_str) == Some("usePodCidr") {
                ipam.insert("subnet".into(), json!(cidrs[0]));
            }
            if let Some(ranges) = ipam.get_mut("ranges").and_then(Value::as_array_mut) {
                let mut expanded = Vec::new();
                for set in ranges.iter() {
                    let is_template = set.as_array().is_some_and(|s| {
                        s.iter()
                            .any(|r| r.get("subnet").and_then(Value::as_str) == Some("usePodCidr"))
                    });
                    if is_template {
                        for c in &cidrs {
                            expanded.push(json!([{ "subnet": c }]));
                        }
                    } else {
                        expanded.push(set.clone());
                    }
                }
                *ranges = expanded;
            }
        }
        if let Some(obj) = out.raw.as_object_mut() {
            obj.insert("plugins".into(), Value::Array(out.plugins.clone()));
        }
        Ok(out)
    }
}

/// What the runtime hands to plugins that declare the matching capability.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RuntimeConf {
    /// `portMappings`: `{hostPort, containerPort, protocol, hostIP}`.
    pub port_mappings: Vec<Value>,
    /// `dns`: `{servers, searches, options}`, when the pod has a DNS config.
    pub dns: Option<Value>,
    /// `bandwidth`: `{ingressRate, ingressBurst, egressRate, egressBurst}` (bits/s, bits).
    pub bandwidth: Option<Value>,
}

impl RuntimeConf {
    /// The capability args as a map keyed by capability name.
    fn by_capability(&self) -> Map<String, Value> {
        let mut m = Map::new();
        if !self.port_mappings.is_empty() {
            m.insert("portMappings".into(), json!(self.port_mappings));
        }
        if let Some(d) = &self.dns {
            m.insert("dns".into(), d.clone());
        }
        if let Some(b) = &self.bandwidth {
            m.insert("bandwidth".into(), b.clone());
        }
        m
    }
}

/// One plugin's stdin config: the plugin's object plus the list's `name` and
/// `cniVersion`, the `runtimeConfig` for the capabilities it declares, and `prevResult`.
pub fn plugin_config(
    list: &NetConfList,
    plugin: &Value,
    rt: &RuntimeConf,
    prev: Option<&Value>,
) -> Value {
    let mut obj = plugin.as_object().cloned().unwrap_or_default();
    obj.insert("name".into(), json!(list.name));
    obj.insert("cniVersion".into(), json!(list.cni_version));
    let caps = rt.by_capability();
    let mut runtime = Map::new();
    if let Some(declared) = plugin.get("capabilities").and_then(Value::as_object) {
        for (cap, on) in declared {
            if on.as_bool() == Some(true) {
                if let Some(v) = caps.get(cap) {
                    runtime.insert(cap.clone(), v.clone());
                }
            }
        }
    }
    if !runtime.is_empty() {
        obj.insert("runtimeConfig".into(), Value::Object(runtime));
    }
    match prev {
        Some(p) => {
            obj.insert("prevResult".into(), p.clone());
        }
        None => {
            obj.remove("prevResult");
        }
    }
    Value::Object(obj)
}

/// Finds a plugin binary in the bin dirs.
pub fn find_plugin(bin_dirs: &[PathBuf], kind: &str) -> Option<PathBuf> {
    if kind.contains('/') || kind.is_empty() {
        return None;
    }
    bin_dirs
        .iter()
        .map(|d| d.join(kind))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file()))
}

/// The config files of the conf dir in the order they are tried: by file name, with
/// `*.conflist`, `*.conf` and `*.json` all considered (as libcni does).
fn candidates(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("conflist" | "conf" | "json")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// A cheap fingerprint of everything that decides which config is valid: the conf dir's
/// files (name, size, mtime) and the bin dirs' mtimes. Equal fingerprints need no reload.
pub fn fingerprint(conf_dir: &Path, bin_dirs: &[PathBuf]) -> Vec<(PathBuf, u64, i128)> {
    let stamp = |p: &Path| {
        p.metadata().ok().map(|m| {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos() as i128)
                .unwrap_or(-1);
            (p.to_owned(), m.len(), mtime)
        })
    };
    let mut out: Vec<_> = std::iter::once(conf_dir.to_owned())
        .chain(candidates(conf_dir))
        .chain(bin_dirs.iter().cloned())
        .filter_map(|p| stamp(&p))
        .collect();
    out.sort();
    out
}

/// The first valid network config of the conf dir: parsable, and every plugin found in
/// the bin dirs.
pub fn load(conf_dir: &Path, bin_dirs: &[PathBuf]) -> Result<NetConfList, ConfError> {
    let files = candidates(conf_dir);
    if files.is_empty() {
        return Err(ConfError::NoConfig(conf_dir.to_owned()));
    }
    let mut problems = Vec::new();
    for f in files {
        let single = f.extension().and_then(|e| e.to_str()) != Some("conflist");
        let text = match std::fs::read_to_string(&f) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("{}: {e}", f.display()));
                continue;
            }
        };
        let list = match NetConfList::parse(&f, &text, single) {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!("{}: {e}", f.display()));
                continue;
            }
        };
        let missing: Vec<&str> = list
            .types()
            .into_iter()
            .filter(|t| find_plugin(bin_dirs, t).is_none())
            .collect();
        if !missing.is_empty() {
            let dirs: Vec<String> = bin_dirs.iter().map(|d| d.display().to_string()).collect();
            problems.push(format!(
                "{}: plugin {} not found in {}",
                f.display(),
                missing.join(", "),
                dirs.join(":")
            ));
            continue;
        }
        return Ok(list);
    }
    Err(ConfError::NoValidConfig {
        dir: conf_dir.to_owned(),
        problems,
    })
}

/// Parses a Kubernetes quantity (`10M`, `1Gi`, `500k`, `1e6`) as a number.
pub fn parse_quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        _ => return None,
    };
    let v = n * mult;
    (v.is_finite() && v >= 0.0).then_some(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"cniVersion":"1.0.0","name":"n","plugins":[
        {"type":"bridge","bridge":"b0","ipam":{"type":"host-local","ranges":[[{"subnet":"usePodCidr"}],[{"subnet":"fd00::/64"}]]}},
        {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn parses_lists_and_single_confs() {
        let l = NetConfList::parse(Path::new("a.conflist"), LIST, false).expect("list");
        assert_eq!(l.types(), vec!["bridge", "portmap"]);
        assert_eq!(l.cni_version, "1.0.0");
        let c = NetConfList::parse(
            Path::new("a.conf"),
            r#"{"cniVersion":"0.4.0","name":"x","type":"bridge"}"#,
            true,
        )
        .expect("conf");
        assert_eq!(c.types(), vec!["bridge"]);
        assert_eq!(c.raw["plugins"][0].get("name"), None);
        assert!(NetConfList::parse(Path::new("b"), "{", false).is_err());
        assert!(NetConfList::parse(Path::new("b"), r#"{"name":"x","plugins":[]}"#, false).is_err());
        assert!(
            NetConfList::parse(Path::new("b"), r#"{"plugins":[{"type":"x"}]}"#, false).is_err()
        );
    }

    #[test]
    fn pod_cidr_fills_use_pod_cidr() {
        let l = NetConfList::parse(Path::new("a.conflist"), LIST, false).expect("list");
        assert!(matches!(
            l.with_pod_cidr(None),
            Err(ConfError::NoPodCidr(_))
        ));
        let f = l
            .with_pod_cidr(Some("10.1.0.0/24, fd01::/64"))
            .expect("filled");
        let ranges = &f.plugins[0]["ipam"]["ranges"];
        assert_eq!(
            ranges,
            &json!([[{"subnet":"10.1.0.0/24"}],[{"subnet":"fd01::/64"}],[{"subnet":"fd00::/64"}]])
        );
        assert_eq!(f.raw["plugins"][0]["ipam"]["ranges"], *ranges);
    }

    #[test]
    fn runtime_config_only_for_declared_capabilities() {
        let l = NetConfList::parse(Path::new("a.conflist"), LIST, false).expect("list");
        let rt = RuntimeConf {
            port_mappings: vec![json!({"hostPort": 8080, "containerPort": 80, "protocol": "tcp"})],
            dns: Some(json!({"servers": ["1.1.1.1"]})),
            bandwidth: None,
        };
        let bridge = plugin_config(&l, &l.plugins[0], &rt, None);
        assert!(bridge.get("runtimeConfig").is_none());
        assert_eq!(bridge["name"], "n");
        let prev = json!({"cniVersion":"1.0.0","ips":[]});
        let pm = plugin_config(&l, &l.plugins[1], &rt, Some(&prev));
        assert_eq!(pm["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        assert!(pm["runtimeConfig"].get("dns").is_none());
        assert_eq!(pm["prevResult"], prev);
    }

    #[test]
    fn load_picks_the_first_valid_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bins = tempfile::tempdir().expect("bins");
        assert!(matches!(
            load(dir.path(), &[bins.path().to_owned()]),
            Err(ConfError::NoConfig(_))
        ));
        std::fs::write(dir.path().join("05-broken.conflist"), "{nope").expect("write");
        std::fs::write(dir.path().join("10-a.conflist"), LIST).expect("write");
        let err = load(dir.path(), &[bins.path().to_owned()]).expect_err("no plugins");
        let msg = err.to_string();
        assert!(msg.contains("05-broken.conflist: not JSON"), "{msg}");
        assert!(msg.contains("plugin bridge, portmap not found"), "{msg}");
        for b in ["bridge", "portmap"] {
            std::fs::write(bins.path().join(b), "").expect("write");
        }
        let l = load(dir.path(), &[bins.path().to_owned()]).expect("valid");
        assert_eq!(l.name, "n");
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("10M"), Some(10_000_000));
        assert_eq!(parse_quantity("1Mi"), Some(1_048_576));
        assert_eq!(parse_quantity("1e3"), Some(1000));
        assert_eq!(parse_quantity("5x"), None);
    }
}
