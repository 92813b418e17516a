//! The vm runtime class's settings (runtime-classes/vm.toml `[settings]`, handed to the
//! shim as JSON) and the VM size of a pod.

use std::path::PathBuf;

use isola_proto::cri;
use serde::Deserialize;

/// Settings of the vm runtime class.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmSettings {
    /// "auto", "builtin" or "qemu".
    pub hypervisor: String,
    /// Base vCPUs of every VM.
    pub vcpus: u32,
    /// Base guest memory of every VM, in MiB.
    pub memory_mib: u32,
    /// Guest kernel (PVH vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Guest initramfs with isola-guest as /init.
    pub initramfs: PathBuf,
    /// The guest agent with its shim (a static isola-guest built with the `shim`
    /// feature), bind-mounted read-only into the pod's virtio-fs share; /init executes it
    /// there when the pod's shim API starts, so the guest holds only the pages it runs.
    /// Empty: the initramfs's /init must serve the shim API itself (a full isola-guest).
    pub agent: PathBuf,
    /// Extra kernel command line.
    pub kernel_params: String,
    /// QEMU binary (for the qemu backend).
    pub qemu_binary: PathBuf,
    /// virtiofsd binary.
    pub virtiofsd_binary: PathBuf,
    /// Seconds the guest gets to power off before the VMM is killed.
    pub shutdown_grace_seconds: u64,
    /// QEMU's TCG translation cache in MiB, where QEMU runs without hardware
    /// virtualisation: memory per pod against start-up and exec speed.
    pub tcg_tb_mib: u32,
    /// Guest pages the guest frees go back to the host (virtio-balloon free page
    /// reporting; QEMU backend).
    pub free_page_reporting: bool,
}

impl Default for VmSettings {
    fn default() -> Self {
        Self {
            hypervisor: "auto".into(),
            vcpus: 1,
            memory_mib: 256,
            kernel: crate::assets::guest_kernel(),
            initramfs: crate::assets::guest_initramfs(),
            agent: crate::assets::guest_agent(),
            kernel_params: String::new(),
            qemu_binary: "qemu-system-x86_64".into(),
            virtiofsd_binary: crate::virtiofsd::default_binary(),
            shutdown_grace_seconds: 5,
            tcg_tb_mib: 12,
            free_page_reporting: true,
        }
    }
}

impl VmSettings {
    /// Parses the class settings JSON ("" means defaults); an unknown key or a bad value
    /// is an error naming it.
    pub fn from_json(json: &str) -> Result<Self, String> {
        if json.trim().is_empty() {
            return Ok(Self::default());
        }
        let s: Self = serde_json::from_str(json).map_err(|e| format!("vm class settings: {e}"))?;
        if s.vcpus == 0 {
            return Err("vm class settings: vcpus must be at least 1".into());
        }
        if s.memory_mib < 64 {
            return Err(format!(
                "vm class settings: memory_mib {} is below the 64 MiB a guest needs",
                s.memory_mib
            ));
        }
        Ok(s)
    }
}

/// The VM's size: the class's base plus the pod's resource limits (CRI
/// `LinuxPodSandboxConfig.resources`, the sum of its containers' limits). The pod's
/// `overhead` is what the VM itself costs on the host (VMM, virtiofsd, guest kernel):
/// kubelet accounts it to the pod cgroup, which holds those processes; the class's base
/// size is what pays for it inside the guest, so it is not added twice.
pub fn vm_size(settings: &VmSettings, pod: &cri::PodSandboxConfig) -> (u32, u32) {
    let host_cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let res = pod.linux.as_ref().and_then(|l| l.resources.as_ref());
    let extra_cpus = res
        .filter(|r| r.cpu_quota > 0 && r.cpu_period > 0)
        .map(|r| (r.cpu_quota as u64).div_ceil(r.cpu_period as u64) as u32)
        .unwrap_or(0);
    let extra_mib = res
        .filter(|r| r.memory_limit_in_bytes > 0)
        .map(|r| (r.memory_limit_in_bytes as u64).div_ceil(1 << 20) as u32)
        .unwrap_or(0);
    let vcpus = (settings.vcpus + extra_cpus).clamp(1, host_cpus.max(settings.vcpus));
    (vcpus, settings.memory_mib.saturating_add(extra_mib))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_class_file_settings_and_refuses_unknown_keys() {
        let s = VmSettings::from_json(
            r#"{"hypervisor":"qemu","vcpus":2,"memory_mib":300,"kernel":"/k","initramfs":"/i","kernel_params":"x=1"}"#,
        )
        .expect("valid settings");
        assert_eq!((s.vcpus, s.memory_mib), (2, 300));
        assert_eq!(s.kernel, PathBuf::from("/k"));
        assert!(s.free_page_reporting, "on unless the class turns it off");
        let off = VmSettings::from_json(r#"{"free_page_reporting":false}"#).expect("valid");
        assert!(!off.free_page_reporting);
        let e = VmSettings::from_json(r#"{"vcpu":2}"#).expect_err("unknown key");
        assert!(e.contains("vcpu"), "{e}");
        assert!(VmSettings::from_json(r#"{"memory_mib":16}"#).is_err());
        assert!(VmSettings::from_json("").is_ok());
    }

    #[test]
    fn size_adds_the_pods_limits() {
        let s = VmSettings::default();
        let mut pod = cri::PodSandboxConfig::default();
        assert_eq!(vm_size(&s, &pod), (1, 256));
        pod.linux = Some(cri::LinuxPodSandboxConfig {
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 100 << 20,
                cpu_quota: 50_000,
                cpu_period: 100_000,
                ..Default::default()
            }),
            ..Default::default()
        });
        let (cpus, mib) = vm_size(&s, &pod);
        assert_eq!(mib, 356);
        assert!(cpus >= 1);
    }
}
