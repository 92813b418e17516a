//! Exec, Attach and PortForward: validated here, then parked in the streaming server
//! under a single-use token; the answer is the URL holding that token.

use isola_proto::cri;

use super::CriError;
use crate::records::ContainerState;
use crate::runtime::Runtime;

use crate::streaming::{Request, Streams};

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
    fn running_container(&self, id: &str) -> Result<String, CriError> {
        let c = self.find_container(id)?;
        if c.state != ContainerState::Running {
            return Err(CriError::FailedPrecondition(format!(
                "container {} is not running",
                c.id
            )));
        }
        Ok(c.id)
    }

    fn park(&self, req: Request) -> Result<String, CriError> {
        self.streaming
            .url_for(req)
            .map_err(|e| CriError::Unavailable(e.to_string()))
    }

    /// Exec.
    pub fn exec(&self, req: cri::ExecRequest) -> Result<cri::ExecResponse, CriError> {
        let container_id = self.running_container(&req.container_id)?;
        if req.cmd.is_empty() {
            return Err(CriError::InvalidArgument("cmd must not be empty".into()));
        }
        check_streams(req.stdin, req.stdout, req.stderr, req.tty)?;
        let url = self.park(Request::Exec {
            container_id,
            cmd: req.cmd,
            streams: Streams {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                tty: req.tty,
            },
        })?;
        Ok(cri::ExecResponse { url })
    }

    /// Attach.
    pub fn attach(&self, req: cri::AttachRequest) -> Result<cri::AttachResponse, CriError> {
        let container_id = self.running_container(&req.container_id)?;
        check_streams(req.stdin, req.stdout, req.stderr, req.tty)?;
        let url = self.park(Request::Attach {
            container_id,
            streams: Streams {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                tty: req.tty,
            },
        })?;
        Ok(cri::AttachResponse { url })
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
        let url = self.park(Request::PortForward {
            sandbox_id: sb.id,
            ports: req.port.iter().map(|p| *p as u16).collect(),
        })?;
        Ok(cri::PortForwardResponse { url })
    }
}
