//! Runtime classes: a CRI runtime handler name → which shim serves the pod, with what
//! settings. `native` and `vm` are embedded; a directory of TOML files can override
//! them or add more.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const EMBEDDED: &[(&str, &str)] = &[
    (
        "native.toml",
        include_str!("../../runtime-classes/native.toml"),
    ),
    ("vm.toml", include_str!("../../runtime-classes/vm.toml")),
];

/// Errors loading or resolving runtime classes.
#[derive(Debug, thiserror::Error)]
pub enum ClassError {
    /// A class file is not valid.
    #[error("runtime class {file}: {reason}")]
    Invalid {
        /// The file (or embedded name).
        file: String,
        /// Why.
        reason: String,
    },
    /// The override directory could not be read.
    #[error("reading runtime class directory {dir}: {source}")]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A pod named a handler no class defines.
    #[error("unknown runtime handler {handler:?}; configured handlers: {known}")]
    UnknownHandler {
        /// The handler the pod asked for.
        handler: String,
        /// The configured handlers, comma separated.
        known: String,
    },
}

/// Which shim binary serves pods of a class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShimKind {
    /// `isola-shim-native`: namespaces and cgroups on the host kernel.
    Native,
    /// `isola-shim-vm`: a microVM per pod.
    Vm,
}

impl ShimKind {
    /// The shim binary's file name.
    pub fn binary(self) -> &'static str {
        match self {
            ShimKind::Native => "isola-shim-native",
            ShimKind::Vm => "isola-shim-vm",
        }
    }

    /// The kind's name as in class files.
    pub fn as_str(self) -> &'static str {
        match self {
            ShimKind::Native => "native",
            ShimKind::Vm => "vm",
        }
    }
}

/// Resources a class adds for the pod's runtime itself (the RuntimeClass overhead).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overhead {
    /// CPU in millicores.
    #[serde(default)]
    pub cpu_millis: u64,
    /// Memory in MiB.
    #[serde(default)]
    pub memory_mib: u64,
}

/// One runtime class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeClass {
    /// The CRI runtime handler name (`RuntimeClass.handler` in Kubernetes).
    pub handler: String,
    /// The shim that serves it.
    pub shim: ShimKind,
    /// Resources the runtime itself uses per pod.
    #[serde(default)]
    pub overhead: Overhead,
    /// Shim-specific settings, handed to the shim as JSON.
    #[serde(default)]
    pub settings: toml::Table,
}

impl RuntimeClass {
    fn parse(file: &str, text: &str) -> Result<RuntimeClass, ClassError> {
        let class: RuntimeClass = toml::from_str(text).map_err(|e| ClassError::Invalid {
            file: file.to_owned(),
            reason: e.to_string(),
        })?;
        if class.handler.is_empty() {
            return Err(ClassError::Invalid {
                file: file.to_owned(),
                reason: "handler must not be empty".into(),
            });
        }
        if class.shim == ShimKind::Vm {
            for key in ["vcpus", "memory_mib", "kernel", "initramfs"] {
                if !class.settings.contains_key(key) {
                    return Err(ClassError::Invalid {
                        file: file.to_owned(),
                        reason: format!("a vm class needs settings.{key}"),
                    });
                }
            }
        }
        Ok(class)
    }

    /// The settings as a JSON document for the shim.
    pub fn settings_json(&self) -> String {
        serde_json::to_string(&self.settings).unwrap_or_else(|_| "{}".into())
    }
}

/// The set of runtime classes the agent serves.
#[derive(Debug, Clone)]
pub struct RuntimeClasses {
    classes: BTreeMap<String, RuntimeClass>,
    default_handler: String,
}

impl RuntimeClasses {
    /// The embedded classes, overridden or extended by `*.toml` files in `dir` (a missing
    /// directory is fine), with `default_handler` for pods that name none.
    pub fn load(dir: &Path, default_handler: &str) -> Result<RuntimeClasses, ClassError> {
        let mut classes = BTreeMap::new();
        for (name, text) in EMBEDDED {
            let class = RuntimeClass::parse(&format!("embedded {name}"), text)?;
            classes.insert(class.handler.clone(), class);
        }
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                let mut files: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                    .collect();
                files.sort();
                for file in files {
                    let shown = file.display().to_string();
                    let text = std::fs::read_to_string(&file).map_err(|e| ClassError::Invalid {
                        file: shown.clone(),
                        reason: e.to_string(),
                    })?;
                    let class = RuntimeClass::parse(&shown, &text)?;
                    classes.insert(class.handler.clone(), class);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ClassError::ReadDir {
                    dir: dir.to_owned(),
                    source,
                })
            }
        }
        if !classes.contains_key(default_handler) {
            return Err(ClassError::Invalid {
                file: "config".into(),
                reason: format!(
                    "default_runtime_handler {default_handler:?} is not a configured handler ({})",
                    classes.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        Ok(RuntimeClasses {
            classes,
            default_handler: default_handler.to_owned(),
        })
    }

    /// The class for a pod's handler; the empty handler is the default one.
    pub fn resolve(&self, handler: &str) -> Result<&RuntimeClass, ClassError> {
        let name = if handler.is_empty() {
            &self.default_handler
        } else {
            handler
        };
        self.classes
            .get(name)
            .ok_or_else(|| ClassError::UnknownHandler {
                handler: handler.to_owned(),
                known: self.handlers().collect::<Vec<_>>().join(", "),
            })
    }

    /// Every configured handler name, sorted.
    pub fn handlers(&self) -> impl Iterator<Item = &str> {
        self.classes.keys().map(String::as_str)
    }

    /// Every class, sorted by handler.
    pub fn iter(&self) -> impl Iterator<Item = &RuntimeClass> {
        self.classes.values()
    }

    /// The handler used when a pod names none.
    pub fn default_handler(&self) -> &str {
        &self.default_handler
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_classes_load_and_resolve() {
        let dir = tempfile::tempdir().expect("tempdir");
        let classes = RuntimeClasses::load(&dir.path().join("missing"), "native").expect("load");
        assert_eq!(classes.handlers().collect::<Vec<_>>(), vec!["native", "vm"]);
        assert_eq!(classes.resolve("").expect("default").handler, "native");
        let vm = classes.resolve("vm").expect("vm");
        assert_eq!(vm.shim, ShimKind::Vm);
        assert!(vm.overhead.memory_mib > 0);
        assert!(vm.settings_json().contains("\"hypervisor\":\"auto\""));
        let err = classes.resolve("kata").expect_err("unknown");
        let msg = err.to_string();
        assert!(
            msg.contains("\"kata\"") && msg.contains("native, vm"),
            "{msg}"
        );
    }

    #[test]
    fn directory_overrides_and_adds() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("vm.toml"),
            "handler = \"vm\"\nshim = \"vm\"\n[settings]\nvcpus = 2\nmemory_mib = 512\nkernel = \"/k\"\ninitramfs = \"/i\"\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("fast.toml"),
            "handler = \"fast\"\nshim = \"native\"\n",
        )
        .expect("write");
        let classes = RuntimeClasses::load(dir.path(), "fast").expect("load");
        assert_eq!(
            classes.handlers().collect::<Vec<_>>(),
            vec!["fast", "native", "vm"]
        );
        assert_eq!(classes.resolve("").expect("default").handler, "fast");
        assert_eq!(
            classes.resolve("vm").expect("vm").settings["vcpus"].as_integer(),
            Some(2)
        );
    }

    #[test]
    fn invalid_classes_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("bad.toml"),
            "handler = \"vm2\"\nshim = \"vm\"\n",
        )
        .expect("write");
        let err = RuntimeClasses::load(dir.path(), "native").expect_err("invalid");
        assert!(err.to_string().contains("settings.vcpus"), "{err}");
        let dir2 = tempfile::tempdir().expect("tempdir");
        let err = RuntimeClasses::load(dir2.path(), "nope").expect_err("bad default");
        assert!(err.to_string().contains("\"nope\""), "{err}");
    }
}
