//! The pod's VM, owned by one long-lived thread: the hypervisor layer is synchronous,
//! and the VMM and virtiofsd are started with a parent-death signal, which fires when
//! the *thread* that spawned them ends — so they must not be spawned from a tokio
//! blocking-pool thread that retires when idle.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use isola_proto::guest::{
    ConfigureInterfaceRequest, HelloResponse, MountRequest, ServeShimRequest,
};
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::hypervisor::{Device, Hypervisor, VmConfig, VmError, VmExit};
use crate::select::Selection;

use super::share::{GUEST_SHARE, SHARE_TAG};

/// Everything needed to boot the pod's VM and bring its guest to the shim API.
#[derive(Debug)]
pub struct BootPlan {
    /// The VM.
    pub config: VmConfig,
    /// Its backend.
    pub selection: Selection,
    /// The TAP for the pod network and the guest MAC.
    pub tap: Option<(OwnedFd, String)>,
    /// The host side of the virtio-fs share.
    pub share_dir: PathBuf,
    /// The guest's eth0.
    pub interface: Option<ConfigureInterfaceRequest>,
    /// The switch to the shim API.
    pub serve: ServeShimRequest,
}

/// A booted VM whose guest serves the shim API.
#[derive(Debug)]
pub struct Booted {
    /// The channel, now carrying HTTP/2 to the guest's shim service.
    pub stream: UnixStream,
    /// The guest's hello.
    pub hello: HelloResponse,
    /// Host processes of the VM (VMM first, then helpers).
    pub pids: Vec<u32>,
}

enum Cmd {
    Boot(Box<BootPlan>, oneshot::Sender<Result<Booted, VmError>>),
    Stop(Duration, oneshot::Sender<()>),
}

/// Handle to the VM thread.
#[derive(Debug, Clone)]
pub struct VmThread {
    cmds: mpsc::Sender<Cmd>,
    exited: watch::Receiver<Option<String>>,
}

fn describe(r: &Result<VmExit, VmError>) -> String {
    match r {
        Ok(exit) => format!("the VM ended ({})", exit.status),
        Err(e) => e.to_string(),
    }
}

fn boot(plan: BootPlan) -> Result<(Box<dyn Hypervisor>, Booted), VmError> {
    let mut vm = crate::new_hypervisor(plan.selection, plan.config)?;
    vm.prepare()?;
    vm.add_device(Device::Fs {
        tag: SHARE_TAG.into(),
        shared_dir: plan.share_dir,
    })?;
    if let Some((tap, mac)) = plan.tap {
        vm.add_device(Device::Net {
            tap,
            mac: Some(mac),
        })?;
    }
    vm.start()?;
    let up = (|| -> Result<Booted, VmError> {
        let mut agent = vm.agent()?;
        let hello = agent.hello()?;
        agent.mount(MountRequest {
            source: SHARE_TAG.into(),
            target: GUEST_SHARE.into(),
            fstype: "virtiofs".into(),
            data: String::new(),
            readonly: false,
        })?;
        if let Some(iface) = plan.interface {
            agent.configure_interface(iface)?;
        }
        let stream = agent.serve_shim(plan.serve)?;
        Ok(Booted {
            stream,
            hello,
            pids: vm.pids(),
        })
    })();
    match up {
        Ok(b) => Ok((vm, b)),
        Err(e) => {
            let _ = vm.stop(Duration::from_millis(500));
            Err(e)
        }
    }
}

impl VmThread {
    /// Starts the thread (no VM yet).
    pub fn spawn() -> std::io::Result<VmThread> {
        let (cmds, rx) = mpsc::channel::<Cmd>();
        let (exited_tx, exited) = watch::channel(None);
        std::thread::Builder::new()
            .name("vm".into())
            .spawn(move || {
                let mut vm: Option<Box<dyn Hypervisor>> = None;
                loop {
                    match rx.recv_timeout(Duration::from_millis(50)) {
                        Ok(Cmd::Boot(plan, reply)) => {
                            let r = boot(*plan).map(|(v, b)| {
                                vm = Some(v);
                                b
                            });
                            let _ = reply.send(r);
                        }
                        Ok(Cmd::Stop(grace, reply)) => {
                            if let Some(mut v) = vm.take() {
                                let r = v.stop(grace);
                                info!(result = %describe(&r), "vm stopped");
                                exited_tx.send_replace(Some(describe(&r)));
                            }
                            let _ = reply.send(());
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let Some(v) = vm.as_mut() else { continue };
                            match v.wait(Some(Duration::ZERO)) {
                                Err(VmError::Timeout(..)) => {}
                                r => {
                                    warn!(result = %describe(&r), "the VM ended by itself");
                                    exited_tx.send_replace(Some(describe(&r)));
                                    vm = None;
                                }
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            if let Some(mut v) = vm.take() {
                                let _ = v.stop(Duration::from_secs(1));
                            }
                            return;
                        }
                    }
                }
            })?;
        Ok(VmThread { cmds, exited })
    }

    /// Boots the VM as planned.
    pub async fn boot(&self, plan: BootPlan) -> Result<Booted, VmError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Boot(Box::new(plan), tx))
            .map_err(|_| VmError::State("the VM thread is gone"))?;
        rx.await
            .map_err(|_| VmError::State("the VM thread is gone"))?
    }

    /// Stops the VM (the VMM is asked to quit, then killed after `grace`); no-op without one.
    pub async fn stop(&self, grace: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Stop(grace, tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Why the VM ended, once it has.
    pub fn exited(&self) -> Option<String> {
        self.exited.borrow().clone()
    }

    /// A receiver that changes when the VM ends.
    pub fn watch(&self) -> watch::Receiver<Option<String>> {
        self.exited.clone()
    }
}
