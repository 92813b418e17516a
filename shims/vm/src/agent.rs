//! The host's client of the guest API (`proto/guest.proto`) over the agent channel.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use isola_guest::frame::{read_frame, write_frame, FrameError};
use isola_proto::guest::{
    request, response, ConfigureInterfaceRequest, ExecRequest, ExecResponse, HelloRequest,
    HelloResponse, MountRequest, ReadFileRequest, Request, Response, ServeShimRequest,
    ShutdownRequest, WriteFileRequest,
};

/// Errors of a guest API call.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The channel failed (the guest may be gone).
    #[error("agent channel: {0}")]
    Channel(#[from] FrameError),
    /// Sending failed.
    #[error("agent channel write: {0}")]
    Write(std::io::Error),
    /// The channel closed before the answer came.
    #[error("agent channel closed before answering {0}")]
    Closed(&'static str),
    /// No answer within the call's timeout.
    #[error("guest agent did not answer {call} within {timeout:?}")]
    Timeout {
        /// The call.
        call: &'static str,
        /// The timeout.
        timeout: Duration,
    },
    /// The guest answered with an error.
    #[error("guest agent: {call}: {message}")]
    Guest {
        /// The call.
        call: &'static str,
        /// The guest's message.
        message: String,
    },
    /// The guest answered with the wrong kind of response.
    #[error("guest agent answered {call} with an unexpected response")]
    Unexpected {
        /// The call.
        call: &'static str,
    },
    /// The guest speaks another API version.
    #[error("guest API version {guest}, host speaks {host}")]
    Version {
        /// The guest's version.
        guest: u32,
        /// Ours.
        host: u32,
    },
}

/// A synchronous client: one call at a time, answers matched by id.
#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    next_id: u64,
    timeout: Duration,
}

macro_rules! expect_kind {
    ($resp:expr, $call:expr, $variant:ident) => {
        match $resp {
            response::Kind::$variant(r) => Ok(r),
            _ => Err(AgentError::Unexpected { call: $call }),
        }
    };
}

impl AgentClient {
    /// A client on a connected agent channel; each call waits at most `timeout`.
    pub fn new(stream: UnixStream, timeout: Duration) -> Self {
        Self {
            stream,
            next_id: 1,
            timeout,
        }
    }

    /// Changes the per-call timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn call(
        &mut self,
        call: &'static str,
        kind: request::Kind,
    ) -> Result<response::Kind, AgentError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request {
            id,
            kind: Some(kind),
        };
        write_frame(&mut self.stream, &req).map_err(AgentError::Write)?;
        self.stream
            .set_read_timeout(Some(self.timeout))
            .map_err(AgentError::Write)?;
        loop {
            let resp: Response = match read_frame(&mut self.stream) {
                Ok(Some(r)) => r,
                Ok(None) => return Err(AgentError::Closed(call)),
                Err(FrameError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(AgentError::Timeout {
                        call,
                        timeout: self.timeout,
                    })
                }
                Err(e) => return Err(e.into()),
            };
            // Answers to earlier, timed-out calls are skipped.
            if resp.id != id {
                continue;
            }
            return match resp.kind {
                Some(response::Kind::Error(e)) => Err(AgentError::Guest {
                    call,
                    message: e.message,
                }),
                Some(kind) => Ok(kind),
                None => Err(AgentError::Unexpected { call }),
            };
        }
    }

    /// Version check and boot facts.
    pub fn hello(&mut self) -> Result<HelloResponse, AgentError> {
        let kind = request::Kind::Hello(HelloRequest {
            api_version: isola_proto::GUEST_API_VERSION,
        });
        let hello = expect_kind!(self.call("hello", kind)?, "hello", Hello)?;
        if hello.api_version != isola_proto::GUEST_API_VERSION {
            return Err(AgentError::Version {
                guest: hello.api_version,
                host: isola_proto::GUEST_API_VERSION,
            });
        }
        Ok(hello)
    }

    /// Asks the guest to power off; it answers, then resets (which ends the VM).
    pub fn shutdown(&mut self) -> Result<(), AgentError> {
        let kind = request::Kind::Shutdown(ShutdownRequest {});
        expect_kind!(self.call("shutdown", kind)?, "shutdown", Shutdown).map(|_| ())
    }

    /// Runs a program in the guest and returns its status and output.
    pub fn exec(&mut self, req: ExecRequest) -> Result<ExecResponse, AgentError> {
        expect_kind!(self.call("exec", request::Kind::Exec(req))?, "exec", Exec)
    }

    /// mount(2) in the guest.
    pub fn mount(&mut self, req: MountRequest) -> Result<(), AgentError> {
        expect_kind!(
            self.call("mount", request::Kind::Mount(req))?,
            "mount",
            Mount
        )
        .map(|_| ())
    }

    /// Configures a guest network interface.
    pub fn configure_interface(
        &mut self,
        req: ConfigureInterfaceRequest,
    ) -> Result<(), AgentError> {
        let kind = request::Kind::ConfigureInterface(req);
        expect_kind!(
            self.call("configure_interface", kind)?,
            "configure_interface",
            ConfigureInterface
        )
        .map(|_| ())
    }

    /// Reads a guest file.
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>, AgentError> {
        let kind = request::Kind::ReadFile(ReadFileRequest {
            path: path.into(),
            max_bytes: 0,
        });
        expect_kind!(self.call("read_file", kind)?, "read_file", ReadFile).map(|r| r.data)
    }

    /// Writes (creates or truncates) a guest file.
    pub fn write_file(&mut self, path: &str, data: &[u8]) -> Result<(), AgentError> {
        let kind = request::Kind::WriteFile(WriteFileRequest {
            path: path.into(),
            data: data.to_vec(),
            mode: 0,
            append: false,
        });
        expect_kind!(self.call("write_file", kind)?, "write_file", WriteFile).map(|_| ())
    }

    /// Switches the channel to the shim API (see `ServeShimRequest`) and hands back the
    /// raw stream, which from now on carries HTTP/2 to the guest's shim service.
    pub fn serve_shim(mut self, req: ServeShimRequest) -> Result<UnixStream, AgentError> {
        let kind = request::Kind::ServeShim(req);
        expect_kind!(self.call("serve_shim", kind)?, "serve_shim", ServeShim)?;
        self.stream
            .set_read_timeout(None)
            .map_err(AgentError::Write)?;
        Ok(self.stream)
    }
}
