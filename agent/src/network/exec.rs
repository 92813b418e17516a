//! Running one CNI plugin (spec 1.0): the `CNI_*` environment, the config on stdin, the
//! result or error on stdout, a timeout after which the plugin is killed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Errors running a plugin.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The binary is in no bin dir.
    #[error("plugin {kind}: not found in {dirs}")]
    NotFound {
        /// The plugin type.
        kind: String,
        /// The bin dirs searched.
        dirs: String,
    },
    /// The plugin could not be started or talked to.
    #[error("plugin {kind}: {what}: {source}")]
    Io {
        /// The plugin type.
        kind: String,
        /// The step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The plugin ran longer than allowed and was killed.
    #[error("plugin {kind} {command}: no answer within {secs}s (killed)")]
    Timeout {
        /// The plugin type.
        kind: String,
        /// ADD, DEL, CHECK, VERSION.
        command: &'static str,
        /// The limit.
        secs: u64,
    },
    /// The plugin failed and said why (its JSON error on stdout, or its stderr).
    #[error("plugin {kind} {command} failed (code {code}): {msg}{}", if .details.is_empty() { String::new() } else { format!(": {}", .details) })]
    Plugin {
        /// The plugin type.
        kind: String,
        /// ADD, DEL, CHECK, VERSION.
        command: &'static str,
        /// The CNI error code (0 when the plugin gave none).
        code: u64,
        /// Its message.
        msg: String,
        /// Its details.
        details: String,
    },
    /// The plugin succeeded but its output is not a result.
    #[error("plugin {kind} {command}: unreadable result: {why}")]
    BadResult {
        /// The plugin type.
        kind: String,
        /// ADD, CHECK, VERSION.
        command: &'static str,
        /// Why.
        why: String,
    },
}

impl ExecError {
    /// Whether a DEL failed only because what it would delete is already gone; such a
    /// DEL counts as done.
    pub fn is_gone(&self) -> bool {
        match self {
            ExecError::Plugin { msg, details, .. } => {
                let t = format!("{msg} {details}").to_lowercase();
                t.contains("no such file or directory") && t.contains("netns")
            }
            _ => false,
        }
    }
}

/// The CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Add the container to the network.
    Add,
    /// Remove it.
    Del,
    /// Check it is as ADD left it.
    Check,
    /// Which spec versions the plugin speaks.
    Version,
}

impl Command {
    /// The value of `CNI_COMMAND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
        }
    }
}

/// What every plugin call of one attachment shares.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// `CNI_CONTAINERID`: the sandbox id.
    pub container_id: String,
    /// `CNI_NETNS`: the namespace path.
    pub netns: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS` (`K=V;K=V`).
    pub args: String,
    /// Searched for binaries; also `CNI_PATH`.
    pub bin_dirs: Vec<PathBuf>,
    /// Per call.
    pub timeout: Duration,
}

/// Runs `kind` with `command` and `stdin`; returns its stdout parsed as JSON (`Null` for
/// an empty stdout, as DEL gives).
pub async fn run(
    inv: &Invocation,
    kind: &str,
    command: Command,
    stdin: &Value,
) -> Result<Value, ExecError> {
    let cmd_name = command.as_str();
    let bin = super::conf::find_plugin(&inv.bin_dirs, kind).ok_or_else(|| ExecError::NotFound {
        kind: kind.to_owned(),
        dirs: path_list(&inv.bin_dirs),
    })?;
    let io = |what: &'static str| {
        let kind = kind.to_owned();
        move |source| ExecError::Io { kind, what, source }
    };
    let mut c = tokio::process::Command::new(&bin);
    c.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", cmd_name)
        .env("CNI_PATH", path_list(&inv.bin_dirs))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if command != Command::Version {
        c.env("CNI_CONTAINERID", &inv.container_id)
            .env("CNI_NETNS", &inv.netns)
            .env("CNI_IFNAME", &inv.ifname)
            .env("CNI_ARGS", &inv.args);
    }
    let mut child = c.spawn().map_err(io("starting it"))?;
    let input = serde_json::to_vec(stdin).map_err(|e| io("encoding its config")(e.into()))?;
    let mut sin = child.stdin.take();
    let mut sout = child.stdout.take();
    let mut serr = child.stderr.take();
    let talk = async {
        let write = async {
            if let Some(s) = sin.as_mut() {
                s.write_all(&input).await?;
                s.shutdown().await?;
            }
            drop(sin.take());
            Ok::<_, std::io::Error>(())
        };
        let mut out = Vec::new();
        let mut err = Vec::new();
        let read_out = async {
            if let Some(s) = sout.as_mut() {
                s.read_to_end(&mut out).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let read_err = async {
            if let Some(s) = serr.as_mut() {
                s.read_to_end(&mut err).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let (w, o, e) = tokio::join!(write, read_out, read_err);
        // A plugin that exits without reading its config breaks the pipe: not our error.
        if let Err(e) = w {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(e);
            }
        }
        o?;
        e?;
        let status = child.wait().await?;
        Ok((status, out, err))
    };
    let (status, out, err) = match tokio::time::timeout(inv.timeout, talk).await {
        Ok(r) => r.map_err(io("running it"))?,
        Err(_) => {
            // Dropping `talk` dropped the child: kill_on_drop kills it; reap it here.
            return Err(ExecError::Timeout {
                kind: kind.to_owned(),
                command: cmd_name,
                secs: inv.timeout.as_secs(),
            });
        }
    };
    let parsed: Option<Value> = serde_json::from_slice(&out).ok();
    if !status.success() {
        let (code, msg, details) = match &parsed {
            Some(v) if v.get("msg").is_some() => (
                v.get("code").and_then(Value::as_u64).unwrap_or(0),
                v.get("msg")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                v.get("details")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            ),
            _ => {
                let text = String::from_utf8_lossy(if out.is_empty() { &err } else { &out })
                    .trim()
                    .to_owned();
                (0, format!("{status}"), text)
            }
        };
        return Err(ExecError::Plugin {
            kind: kind.to_owned(),
            command: cmd_name,
            code,
            msg,
            details,
        });
    }
    if out.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    parsed.ok_or_else(|| ExecError::BadResult {
        kind: kind.to_owned(),
        command: cmd_name,
        why: format!("not JSON: {:?}", String::from_utf8_lossy(&out)),
    })
}

/// VERSION: the spec versions a plugin supports.
pub async fn version(
    inv: &Invocation,
    kind: &str,
    cni_version: &str,
) -> Result<Vec<String>, ExecError> {
    let v = run(
        inv,
        kind,
        Command::Version,
        &serde_json::json!({ "cniVersion": cni_version }),
    )
    .await?;
    v.get("supportedVersions")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .ok_or_else(|| ExecError::BadResult {
            kind: kind.to_owned(),
            command: "VERSION",
            why: "no supportedVersions".into(),
        })
}

fn path_list(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// The pod's IPs from a result (spec 0.3.0 and later: `ips` with an `interface` index
/// into `interfaces`): those on `ifname` inside the sandbox (or with no interface given),
/// IPv4 first, then IPv6, without prefix lengths.
pub fn pod_ips(result: &Value, ifname: &str, netns: &Path) -> Vec<String> {
    let ifaces = result
        .get("interfaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let netns = netns.to_string_lossy();
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for ip in result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let ours = match ip.get("interface").and_then(Value::as_u64) {
            None => true,
            Some(i) => ifaces.get(i as usize).is_some_and(|iface| {
                let name = iface.get("name").and_then(Value::as_str).unwrap_or("");
                let sandbox = iface.get("sandbox").and_then(Value::as_str).unwrap_or("");
                name == ifname && (sandbox.is_empty() || sandbox == netns)
            }),
        };
        let Some(addr) = ip.get("address").and_then(Value::as_str) else {
            continue;
        };
        let bare = addr.split('/').next().unwrap_or(addr);
        match bare.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(_)) if ours => v4.push(bare.to_owned()),
            Ok(std::net::IpAddr::V6(_)) if ours => v6.push(bare.to_owned()),
            _ => {}
        }
    }
    v4.extend(v6);
    v4
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pod_ips_are_those_of_the_pod_interface_v4_first() {
        let r = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "isola0", "mac": "aa"},
                {"name": "veth1", "mac": "bb"},
                {"name": "eth0", "mac": "cc", "sandbox": "/run/netns/x"}
            ],
            "ips": [
                {"address": "fd00::5/64", "interface": 2},
                {"address": "10.88.0.1/16", "interface": 0},
                {"address": "10.88.0.5/16", "gateway": "10.88.0.1", "interface": 2}
            ]
        });
        assert_eq!(
            pod_ips(&r, "eth0", Path::new("/run/netns/x")),
            vec!["10.88.0.5", "fd00::5"]
        );
    }

    fn script(dir: &Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    fn inv(dir: &Path, secs: u64) -> Invocation {
        Invocation {
            container_id: "c1".into(),
            netns: "/x".into(),
            ifname: "eth0".into(),
            args: "IgnoreUnknown=1".into(),
            bin_dirs: vec![dir.to_owned()],
            timeout: Duration::from_secs(secs),
        }
    }

    #[tokio::test]
    async fn errors_timeouts_and_results() {
        let dir = tempfile::tempdir().expect("tempdir");
        script(
            dir.path(),
            "fails",
            r#"cat >/dev/null; echo '{"cniVersion":"1.0.0","code":11,"msg":"boom","details":"more"}'; exit 1"#,
        );
        script(dir.path(), "slow", "sleep 5");
        script(
            dir.path(),
            "ok",
            r#"read -r cfg; echo "{\"cniVersion\":\"1.0.0\",\"cmd\":\"$CNI_COMMAND\",\"id\":\"$CNI_CONTAINERID\"}""#,
        );
        let i = inv(dir.path(), 1);
        let e = run(&i, "fails", Command::Add, &json!({}))
            .await
            .expect_err("fails");
        assert_eq!(
            e.to_string(),
            "plugin fails ADD failed (code 11): boom: more"
        );
        let t = std::time::Instant::now();
        let e = run(&i, "slow", Command::Add, &json!({}))
            .await
            .expect_err("slow");
        assert!(matches!(e, ExecError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
        let v = run(&i, "ok", Command::Del, &json!({"a": 1}))
            .await
            .expect("ok");
        assert_eq!(v["cmd"], "DEL");
        assert_eq!(v["id"], "c1");
        assert!(matches!(
            run(&i, "missing", Command::Add, &json!({})).await,
            Err(ExecError::NotFound { .. })
        ));
    }
}
