//! AppArmor for containers, where the host has it (as containerd: `RuntimeDefault` is
//! the runtime's default profile, `Localhost` a profile the operator loaded, privileged
//! containers and `Unconfined` run unconfined). libcontainer applies the profile named in
//! the spec's `process.apparmorProfile` at exec.

use std::path::Path;

use isola_proto::cri;

/// The profile `RuntimeDefault` means: deploy/apparmor/isola-default, loaded by
/// deploy/install.sh where AppArmor is enabled.
pub const DEFAULT_PROFILE: &str = "isola-default";

/// Errors choosing a profile.
#[derive(Debug, thiserror::Error)]
pub enum AppArmorError {
    /// The request names a profile the host cannot apply.
    #[error("linux.security_context.apparmor: {0}")]
    Invalid(String),
}

/// What the host's AppArmor offers.
#[derive(Debug, Clone, Default)]
pub struct HostAppArmor {
    /// The LSM is enabled.
    pub enabled: bool,
    /// Names of the loaded profiles.
    pub loaded: Vec<String>,
}

impl HostAppArmor {
    /// Reads /sys/module/apparmor and the loaded profiles from securityfs.
    pub fn detect() -> HostAppArmor {
        let enabled = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
            .map(|s| s.trim() == "Y")
            .unwrap_or(false);
        let loaded = if enabled {
            std::fs::read_to_string(Path::new("/sys/kernel/security/apparmor/profiles"))
                .map(|s| parse_profiles(&s))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        HostAppArmor { enabled, loaded }
    }
}

/// Profile names from securityfs's `profiles` ("name (mode)" per line).
pub fn parse_profiles(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let name = match l.rfind(" (") {
                Some(i) => &l[..i],
                None => l,
            };
            (!name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

/// The profile to run the container under, or `None` for unconfined.
pub fn profile(
    sc: &cri::LinuxContainerSecurityContext,
    host: &HostAppArmor,
) -> Result<Option<String>, AppArmorError> {
    use cri::security_profile::ProfileType;
    // The typed field first, then the deprecated string ("runtime/default",
    // "localhost/<name>", "unconfined").
    #[allow(deprecated)]
    let wanted: Option<(ProfileType, String)> = match &sc.apparmor {
        Some(p) => Some((
            ProfileType::try_from(p.profile_type).unwrap_or(ProfileType::Unconfined),
            p.localhost_ref.clone(),
        )),
        None => match sc.apparmor_profile.as_str() {
            "" => None,
            "runtime/default" => Some((ProfileType::RuntimeDefault, String::new())),
            "unconfined" => Some((ProfileType::Unconfined, String::new())),
            p => match p.strip_prefix("localhost/") {
                Some(name) => Some((ProfileType::Localhost, name.to_string())),
                None => {
                    return Err(AppArmorError::Invalid(format!(
                        "apparmor_profile {p:?}: expected runtime/default, unconfined or localhost/<profile>"
                    )))
                }
            },
        },
    };
    if sc.privileged || !host.enabled {
        // containerd does the same: nothing to apply without the LSM, and kubelet does
        // not send profiles to nodes that lack it.
        return match wanted {
            Some((ProfileType::Localhost, name)) if !sc.privileged => Err(AppArmorError::Invalid(
                format!("Localhost profile {name:?}: AppArmor is not enabled on this host"),
            )),
            _ => Ok(None),
        };
    }
    let (kind, name) = match wanted {
        // Unset: the runtime default where it is loaded (containerd's default), else
        // unconfined rather than refusing every container of an unprepared host.
        None if host.loaded.iter().any(|p| p == DEFAULT_PROFILE) => {
            (ProfileType::RuntimeDefault, String::new())
        }
        None => return Ok(None),
        Some(w) => w,
    };
    match kind {
        ProfileType::Unconfined => Ok(None),
        ProfileType::RuntimeDefault => {
            if host.loaded.iter().any(|p| p == DEFAULT_PROFILE) {
                Ok(Some(DEFAULT_PROFILE.to_string()))
            } else {
                Err(AppArmorError::Invalid(format!(
                    "RuntimeDefault needs the {DEFAULT_PROFILE} profile loaded (deploy/install.sh loads deploy/apparmor/{DEFAULT_PROFILE} with apparmor_parser)"
                )))
            }
        }
        ProfileType::Localhost => {
            // kubelet sends the bare name; some clients send it as in the deprecated
            // string ("localhost/<name>"), which containerd accepts too.
            let name = name.strip_prefix("localhost/").unwrap_or(&name).to_owned();
            if name.is_empty() {
                return Err(AppArmorError::Invalid(
                    "Localhost needs localhost_ref (the profile's name)".into(),
                ));
            }
            if host.loaded.contains(&name) {
                Ok(Some(name))
            } else {
                Err(AppArmorError::Invalid(format!(
                    "Localhost profile {name:?} is not loaded on this host"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cri::security_profile::ProfileType;

    fn sc(kind: Option<(ProfileType, &str)>) -> cri::LinuxContainerSecurityContext {
        cri::LinuxContainerSecurityContext {
            apparmor: kind.map(|(k, r)| cri::SecurityProfile {
                profile_type: k as i32,
                localhost_ref: r.into(),
            }),
            ..Default::default()
        }
    }

    fn host() -> HostAppArmor {
        HostAppArmor {
            enabled: true,
            loaded: parse_profiles("isola-default (enforce)\nmy-app (complain)\n"),
        }
    }

    #[test]
    fn chooses_like_containerd() {
        assert_eq!(
            profile(&sc(None), &host()).expect("default").as_deref(),
            Some("isola-default")
        );
        assert_eq!(
            profile(&sc(Some((ProfileType::Localhost, "my-app"))), &host())
                .expect("loaded")
                .as_deref(),
            Some("my-app")
        );
        assert_eq!(
            profile(
                &sc(Some((ProfileType::Localhost, "localhost/my-app"))),
                &host()
            )
            .expect("prefixed")
            .as_deref(),
            Some("my-app")
        );
        assert_eq!(
            profile(&sc(Some((ProfileType::Unconfined, ""))), &host()).expect("unconfined"),
            None
        );
        let e =
            profile(&sc(Some((ProfileType::Localhost, "nope"))), &host()).expect_err("not loaded");
        assert!(e.to_string().contains("\"nope\""), "{e}");
        let mut p = sc(Some((ProfileType::Localhost, "nope")));
        p.privileged = true;
        assert_eq!(profile(&p, &host()).expect("privileged"), None);
        // No AppArmor on the host: nothing applied, but a named profile is an error.
        let none = HostAppArmor::default();
        assert_eq!(
            profile(&sc(Some((ProfileType::RuntimeDefault, ""))), &none).expect("no lsm"),
            None
        );
        assert!(profile(&sc(Some((ProfileType::Localhost, "my-app"))), &none).is_err());
        // RuntimeDefault without the default profile loaded says what to load.
        let bare = HostAppArmor {
            enabled: true,
            loaded: vec![],
        };
        assert_eq!(
            profile(&sc(None), &bare).expect("unset, nothing loaded"),
            None
        );
        let e = profile(&sc(Some((ProfileType::RuntimeDefault, ""))), &bare)
            .expect_err("default missing");
        assert!(e.to_string().contains("isola-default"), "{e}");
    }

    #[test]
    #[allow(deprecated)]
    fn reads_the_deprecated_string() {
        let mut s = sc(None);
        s.apparmor_profile = "localhost/my-app".into();
        assert_eq!(
            profile(&s, &host()).expect("localhost").as_deref(),
            Some("my-app")
        );
        s.apparmor_profile = "unconfined".into();
        assert_eq!(profile(&s, &host()).expect("unconfined"), None);
        s.apparmor_profile = "bogus".into();
        assert!(profile(&s, &host()).is_err());
    }
}
