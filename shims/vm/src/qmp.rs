//! A small QMP (QEMU Machine Protocol) client over QEMU's unix socket.
//!
//! Hand-written: we send three commands (`qmp_capabilities`, `query-status`, `quit`) and
//! read line-delimited JSON. The `qapi` crate (qapi-rs) carries generated types for
//! QEMU's whole schema (qapi-qmp), a large dependency for three commands, and its
//! non-blocking mode is tokio-based; the `qmp` crate is young (0.1) and async-only.
//! serde_json over a `UnixStream` is ~100 lines we fully control, in a layer that is
//! otherwise synchronous.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// Errors talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed.
    #[error("qmp i/o: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU sent something that is not JSON.
    #[error("qmp: bad json from qemu: {0}")]
    Json(#[from] serde_json::Error),
    /// QEMU closed the connection.
    #[error("qmp: qemu closed the connection")]
    Closed,
    /// The greeting was not a QMP greeting.
    #[error("qmp: unexpected greeting {0}")]
    Greeting(String),
    /// A command failed.
    #[error("qmp: {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// A connected, capabilities-negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for command answers (e.g. SHUTDOWN).
    pub events: Vec<Value>,
}

impl QmpClient {
    /// Connects to QEMU's QMP socket at `path` and leaves capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut client = Self {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = client.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Greeting(greeting.to_string()));
        }
        client.execute("qmp_capabilities", None)?;
        Ok(client)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        loop {
            let mut reply = self.read_message()?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if let Some(ret) = reply.get_mut("return") {
                return Ok(ret.take());
            }
            if let Some(err) = reply.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.into(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
        }
    }

    /// `query-status`: the run state ("running", "paused", "shutdown", ...).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let ret = self.execute("query-status", None)?;
        Ok(ret
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }

    /// `quit`: QEMU exits at once.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        }
    }
}
