//! Picking the hypervisor backend for a VM pod from the runtime class's
//! `hypervisor = "auto" | "builtin" | "qemu"` and what the host CPU offers.

use std::fmt;
use std::str::FromStr;

/// Errors choosing a backend.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// The runtime class named a value we do not know.
    #[error("unknown hypervisor {0:?}: expected \"auto\", \"builtin\" or \"qemu\"")]
    Unknown(String),
    /// isola's own VMM was asked for explicitly on a host without /dev/kvm.
    #[error("builtin VMM needs /dev/kvm: use hypervisor = \"qemu\" or \"auto\"")]
    BuiltinUnavailable,
}

/// The runtime class setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HypervisorChoice {
    /// isola's own VMM with hardware virtualisation, QEMU with TCG otherwise.
    #[default]
    Auto,
    /// isola's own VMM (KVM).
    Builtin,
    /// QEMU, with KVM when the CPU has vmx/svm and TCG otherwise.
    Qemu,
}

impl FromStr for HypervisorChoice {
    type Err = SelectError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "builtin" => Ok(Self::Builtin),
            "qemu" => Ok(Self::Qemu),
            other => Err(SelectError::Unknown(other.into())),
        }
    }
}

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's software CPU emulation.
    Tcg,
}

/// The backend that will run the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// isola's own VMM.
    Builtin,
    /// QEMU with the given accelerator.
    Qemu {
        /// kvm or tcg.
        accel: Accel,
    },
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Builtin => f.write_str("builtin"),
            Backend::Qemu { accel: Accel::Kvm } => f.write_str("qemu/kvm"),
            Backend::Qemu { accel: Accel::Tcg } => f.write_str("qemu/tcg"),
        }
    }
}

/// The decision and why, for the shim's log and the pod's Status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// What runs the VM.
    pub backend: Backend,
    /// One sentence on why, e.g. "no vmx/svm in /proc/cpuinfo: qemu with tcg".
    pub reason: String,
}

/// What the host offers for virtualisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostVirt {
    /// "vmx" or "svm" when /proc/cpuinfo has it.
    pub hw_flag: Option<&'static str>,
    /// /dev/kvm exists.
    pub dev_kvm: bool,
}

impl HostVirt {
    /// Reads /proc/cpuinfo and checks /dev/kvm.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self {
            hw_flag: hw_flag(&cpuinfo),
            dev_kvm: std::path::Path::new("/dev/kvm").exists(),
        }
    }
}

/// "vmx" or "svm" if a `flags` line of `cpuinfo` lists it.
pub fn hw_flag(cpuinfo: &str) -> Option<&'static str> {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .find_map(|w| match w {
            "vmx" => Some("vmx"),
            "svm" => Some("svm"),
            _ => None,
        })
}

/// Chooses the backend for `choice` on a host with `host`.
pub fn select(choice: HypervisorChoice, host: HostVirt) -> Result<Selection, SelectError> {
    let qemu = |why: String| -> Selection {
        match (host.hw_flag, host.dev_kvm) {
            (Some(flag), true) => Selection {
                backend: Backend::Qemu { accel: Accel::Kvm },
                reason: format!("{why}{flag} in /proc/cpuinfo and /dev/kvm: qemu with kvm"),
            },
            (Some(flag), false) => Selection {
                backend: Backend::Qemu { accel: Accel::Tcg },
                reason: format!("{why}{flag} in /proc/cpuinfo but no /dev/kvm: qemu with tcg"),
            },
            (None, _) => Selection {
                backend: Backend::Qemu { accel: Accel::Tcg },
                reason: format!(
                    "{why}no vmx/svm in /proc/cpuinfo (a /dev/kvm without them, e.g. PVM, \
                     cannot run a stock Linux guest): qemu with tcg"
                ),
            },
        }
    };
    match (choice, host.hw_flag, host.dev_kvm) {
        (HypervisorChoice::Builtin, _, false) => Err(SelectError::BuiltinUnavailable),
        (HypervisorChoice::Builtin, Some(flag), true) => Ok(Selection {
            backend: Backend::Builtin,
            reason: format!(
                "hypervisor = \"builtin\"; {flag} in /proc/cpuinfo and /dev/kvm: isola's own VMM"
            ),
        }),
        // Asked for explicitly: honoured, with a warning in the reason.
        (HypervisorChoice::Builtin, None, true) => Ok(Selection {
            backend: Backend::Builtin,
            reason: "hypervisor = \"builtin\"; /dev/kvm without vmx/svm in /proc/cpuinfo \
                     (e.g. PVM, which cannot run a stock Linux guest): isola's own VMM anyway"
                .into(),
        }),
        (HypervisorChoice::Qemu, ..) => Ok(qemu("hypervisor = \"qemu\"; ".into())),
        // The own VMM is the fast path where the CPU virtualises.
        (HypervisorChoice::Auto, Some(flag), true) => Ok(Selection {
            backend: Backend::Builtin,
            reason: format!("auto: {flag} in /proc/cpuinfo and /dev/kvm: isola's own VMM"),
        }),
        (HypervisorChoice::Auto, ..) => Ok(qemu("auto: ".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_tcg_without_hw_virt() {
        let host = HostVirt {
            hw_flag: None,
            dev_kvm: true,
        };
        let s = select(HypervisorChoice::Auto, host).unwrap();
        assert_eq!(s.backend, Backend::Qemu { accel: Accel::Tcg });
        assert!(s.reason.contains("no vmx/svm"), "{}", s.reason);
    }

    #[test]
    fn picks_builtin_with_hw_virt_and_qemu_kvm_on_request() {
        let host = HostVirt {
            hw_flag: Some("svm"),
            dev_kvm: true,
        };
        let s = select(HypervisorChoice::Qemu, host).unwrap();
        assert_eq!(s.backend, Backend::Qemu { accel: Accel::Kvm });
        let s = select(HypervisorChoice::Auto, host).unwrap();
        assert_eq!(s.backend, Backend::Builtin);
        assert!(s.reason.contains("svm in /proc/cpuinfo"), "{}", s.reason);
        let s = select(HypervisorChoice::Builtin, host).unwrap();
        assert_eq!(s.backend, Backend::Builtin);
        let no_kvm = HostVirt {
            hw_flag: Some("svm"),
            dev_kvm: false,
        };
        let e = select(HypervisorChoice::Builtin, no_kvm).unwrap_err();
        assert_eq!(
            e.to_string(),
            "builtin VMM needs /dev/kvm: use hypervisor = \"qemu\" or \"auto\""
        );
        assert_eq!(
            select(HypervisorChoice::Auto, no_kvm).unwrap().backend,
            Backend::Qemu { accel: Accel::Tcg }
        );
        let pvm = HostVirt {
            hw_flag: None,
            dev_kvm: true,
        };
        let s = select(HypervisorChoice::Builtin, pvm).unwrap();
        assert!(s.reason.contains("PVM"), "{}", s.reason);
        assert!("kvm".parse::<HypervisorChoice>().is_err());
        assert_eq!(
            "auto".parse::<HypervisorChoice>().unwrap(),
            HypervisorChoice::Auto
        );
    }

    #[test]
    fn reads_cpu_flags() {
        assert_eq!(hw_flag("flags\t: fpu vme svm lm\n"), Some("svm"));
        assert_eq!(hw_flag("flags\t: fpu vme lm\nmodel name: vmx\n"), None);
    }
}
