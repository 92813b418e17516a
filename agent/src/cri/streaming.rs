//! Exec, Attach and PortForward: validated here; they hand out URLs of a streaming
//! server, which is not built yet.

use isola_proto::cri;

use super::CriError;
use crate::records::ContainerState;
use crate::runtime::Runtime;

const NO_STREAMING: &str = "the streaming server (exec/attach/port-forward URLs) is not built yet";

fn check_streams(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Result<(), CriError> {
    if !(stdin || stdout || stderr) {
        return Err(CriError::InvalidArgument(
            "one of stdin, stdout and stderr must be set".into(),
        ));
    }
    if tty && stderr {
        return Err(CriError::InvalidArgument(
            "tty and stderr cannot both be set: a TTY merges stderr into stdout".into(),
        ));
    }
    Ok(())
}

impl Runtime {
    fn running_container(&self, id: &str) -> Result<(), CriError> {
        let c = self.find_container(id)?;
        if c.state != ContainerState::Running {
            return Err(CriError::FailedPrecondition(format!(
                "container {} is not running",
                c.id
            )));
        }
        Ok(())
    }

    /// Exec.
    pub fn exec(&self, req: cri::ExecRequest) -> Result<cri::ExecResponse, CriError> {
        self.running_container(&req.container_id)?;
        if req.cmd.is_empty() {
            return Err(CriError::InvalidArgument("cmd must not be empty".into()));
        }
        check_streams(req.stdin, req.stdout, req.stderr, req.tty)?;
        Err(CriError::Unimplemented(format!("Exec: {NO_STREAMING}")))
    }

    /// Attach.
    pub fn attach(&self, req: cri::AttachRequest) -> Result<cri::AttachResponse, CriError> {
        self.running_container(&req.container_id)?;
        check_streams(req.stdin, req.stdout, req.stderr, req.tty)?;
        Err(CriError::Unimplemented(format!("Attach: {NO_STREAMING}")))
    }

    /// PortForward.
    pub fn port_forward(
        &self,
        req: cri::PortForwardRequest,
    ) -> Result<cri::PortForwardResponse, CriError> {
        let sb = self.find_sandbox(&req.pod_sandbox_id)?;
        if sb.state != crate::records::SandboxState::Ready {
            return Err(CriError::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                sb.id
            )));
        }
        if let Some(p) = req.port.iter().find(|p| **p <= 0 || **p > 65535) {
            return Err(CriError::InvalidArgument(format!(
                "port {p} is not a TCP port number"
            )));
        }
        Err(CriError::Unimplemented(format!(
            "PortForward: {NO_STREAMING}"
        )))
    }
}
