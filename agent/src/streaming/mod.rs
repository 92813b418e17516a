//! The streaming server behind CRI Exec, Attach and PortForward: the CRI call validates
//! the request and parks it under a single-use token ([`tokens`]); the client (kubelet,
//! crictl) then connects to the URL holding that token and speaks SPDY/3.1 or WebSocket
//! ([`server`]); the streams are forwarded to the pod's shim ([`remotecommand`],
//! [`portforward`]).

pub mod portforward;
pub mod remotecommand;
pub mod server;
pub mod tokens;
pub mod websocket;

use std::sync::Mutex;
use std::time::Duration;

use crate::config::StreamingConfig;
use tokens::TokenCache;

/// Errors of the streaming server.
#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    /// The server is not listening (yet).
    #[error("the streaming server is not running")]
    NotRunning,
    /// Too many requests wait for their clients.
    #[error("too many exec/attach/port-forward requests in flight ({0})")]
    TooMany(usize),
    /// Binding the listen address failed.
    #[error("binding the streaming server to {address}: {source}")]
    Bind {
        /// The configured address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A validated request waiting for its client.
#[derive(Debug, Clone)]
pub enum Request {
    /// Run a process in a container.
    Exec {
        /// The container.
        container_id: String,
        /// The command.
        cmd: Vec<String>,
        /// Streams asked for.
        streams: Streams,
    },
    /// Join a container's own stdio.
    Attach {
        /// The container.
        container_id: String,
        /// Streams asked for.
        streams: Streams,
    },
    /// Forward ports of a pod.
    PortForward {
        /// The pod.
        sandbox_id: String,
        /// Ports allowed (empty: any).
        ports: Vec<u16>,
    },
}

/// The standard streams a remotecommand request asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streams {
    /// stdin.
    pub stdin: bool,
    /// stdout.
    pub stdout: bool,
    /// stderr.
    pub stderr: bool,
    /// A terminal (stderr merged into stdout).
    pub tty: bool,
}

impl Request {
    fn path(&self) -> &'static str {
        match self {
            Request::Exec { .. } => "exec",
            Request::Attach { .. } => "attach",
            Request::PortForward { .. } => "portforward",
        }
    }
}

/// The streaming server's state shared with the CRI handlers.
pub struct Streaming {
    tokens: TokenCache,
    base_url: Mutex<Option<String>>,
}

impl Streaming {
    /// State for `config` (the server itself starts with [`server::serve`]).
    pub fn new(config: &StreamingConfig) -> Streaming {
        Streaming {
            tokens: TokenCache::new(Duration::from_secs(config.token_ttl_seconds)),
            base_url: Mutex::new(None),
        }
    }

    /// Records the address the server listens on (the real port when 0 was configured).
    pub fn set_listening(&self, addr: std::net::SocketAddr) {
        *self.base_url.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("http://{addr}"));
    }

    /// Parks `req` under a new token and returns the URL its client must use.
    pub fn url_for(&self, req: Request) -> Result<String, StreamingError> {
        let base = self
            .base_url
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(StreamingError::NotRunning)?;
        let path = req.path();
        let token = self.tokens.insert(req)?;
        Ok(format!("{base}/{path}/{token}"))
    }

    /// Takes the request of a token (once; None when unknown, used or expired).
    pub fn take(&self, token: &str) -> Option<Request> {
        self.tokens.take(token)
    }
}
