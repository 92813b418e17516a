//! The Kubernetes channel protocols spoken over SPDY streams or WebSocket messages:
//! remotecommand (`channel.k8s.io` v1 to v5) and port-forward (`portforward.k8s.io`,
//! and its WebSocket form), with the v4 exit status and the terminal-size messages.

use serde::{Deserialize, Serialize};

/// remotecommand v1 (SPDY).
pub const V1: &str = "channel.k8s.io";
/// remotecommand v2 (SPDY).
pub const V2: &str = "v2.channel.k8s.io";
/// remotecommand v3: adds the resize stream (SPDY).
pub const V3: &str = "v3.channel.k8s.io";
/// remotecommand v4: the error stream carries a JSON Status with the exit code.
pub const V4: &str = "v4.channel.k8s.io";
/// remotecommand v5: adds the close signal for stdin over WebSocket.
pub const V5: &str = "v5.channel.k8s.io";
/// Base64 text framing of v4 over WebSocket.
pub const V4_BASE64: &str = "base64.v4.channel.k8s.io";
/// Base64 text framing of v5 over WebSocket.
pub const V5_BASE64: &str = "base64.v5.channel.k8s.io";
/// Port-forward over SPDY.
pub const PORT_FORWARD: &str = "portforward.k8s.io";

/// Remotecommand subprotocols served over SPDY, most preferred first.
pub const SPDY_REMOTECOMMAND: [&str; 5] = [V5, V4, V3, V2, V1];
/// Remotecommand subprotocols served over WebSocket, most preferred first.
pub const WS_REMOTECOMMAND: [&str; 4] = [V5, V4, V5_BASE64, V4_BASE64];
/// Port-forward subprotocols served over WebSocket.
pub const WS_PORT_FORWARD: [&str; 3] = [V4, V4_BASE64, ""];

/// The header carrying the SPDY subprotocol (one value per offer).
pub const PROTOCOL_HEADER: &str = "X-Stream-Protocol-Version";
/// The SPDY stream header naming a remotecommand stream.
pub const STREAM_TYPE: &str = "streamType";
/// The SPDY stream header naming a port-forward stream's port.
pub const PORT: &str = "port";
/// The SPDY stream header pairing a port-forward data stream with its error stream.
pub const REQUEST_ID: &str = "requestID";

/// WebSocket channel of stdin.
pub const CH_STDIN: u8 = 0;
/// WebSocket channel of stdout.
pub const CH_STDOUT: u8 = 1;
/// WebSocket channel of stderr.
pub const CH_STDERR: u8 = 2;
/// WebSocket channel of the error/status stream.
pub const CH_ERROR: u8 = 3;
/// WebSocket channel of terminal sizes.
pub const CH_RESIZE: u8 = 4;
/// v5 WebSocket: a message `[255, channel]` closes that channel.
pub const CH_CLOSE: u8 = 255;

/// A remotecommand stream, as named by the `streamType` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamType {
    /// The process's stdin.
    Stdin,
    /// Its stdout.
    Stdout,
    /// Its stderr.
    Stderr,
    /// Errors and the exit status.
    Error,
    /// Terminal size changes.
    Resize,
    /// A port-forward data stream.
    Data,
}

impl StreamType {
    /// Parses a `streamType` header value.
    pub fn parse(s: &str) -> Option<StreamType> {
        Some(match s {
            "stdin" => StreamType::Stdin,
            "stdout" => StreamType::Stdout,
            "stderr" => StreamType::Stderr,
            "error" => StreamType::Error,
            "resize" => StreamType::Resize,
            "data" => StreamType::Data,
            _ => return None,
        })
    }

    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamType::Stdin => "stdin",
            StreamType::Stdout => "stdout",
            StreamType::Stderr => "stderr",
            StreamType::Error => "error",
            StreamType::Resize => "resize",
            StreamType::Data => "data",
        }
    }
}

/// A terminal size message (JSON `{"Width":..,"Height":..}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalSize {
    /// Columns.
    #[serde(rename = "Width")]
    pub width: u16,
    /// Rows.
    #[serde(rename = "Height")]
    pub height: u16,
}

/// Splits a stream of concatenated JSON size messages: returns the whole messages and
/// keeps an unfinished tail in `buf`. A malformed message is an error.
pub fn parse_sizes(buf: &mut Vec<u8>) -> Result<Vec<TerminalSize>, serde_json::Error> {
    let mut out = Vec::new();
    let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<TerminalSize>();
    let mut used = 0;
    loop {
        match it.next() {
            Some(Ok(s)) => {
                out.push(s);
                used = it.byte_offset();
            }
            Some(Err(e)) if e.is_eof() => break,
            Some(Err(e)) => return Err(e),
            None => {
                used = buf.len();
                break;
            }
        }
    }
    buf.drain(..used);
    Ok(out)
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
/// A metav1.Status cause.
pub struct StatusCause {
    /// "ExitCode" for an exit status.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The exit code in decimal.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// metav1.Status details.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct StatusDetails {
    /// Causes.
    #[serde(default)]
    pub causes: Vec<StatusCause>,
}

/// The metav1.Status the v4+ error stream carries.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Status {
    /// Always empty.
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// "Success" or "Failure".
    pub status: String,
    /// Human-readable message.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// "NonZeroExitCode", "InternalError".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Causes (the exit code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<StatusDetails>,
}

impl Status {
    /// The status of a process that exited with `code`.
    pub fn exit(code: i32) -> Status {
        if code == 0 {
            return Status {
                status: "Success".into(),
                ..Default::default()
            };
        }
        Status {
            status: "Failure".into(),
            message: format!("command terminated with non-zero exit code: exit status {code}"),
            reason: "NonZeroExitCode".into(),
            details: Some(StatusDetails {
                causes: vec![StatusCause {
                    reason: "ExitCode".into(),
                    message: code.to_string(),
                }],
            }),
            ..Default::default()
        }
    }

    /// A failure that is not an exit code.
    pub fn internal(message: &str) -> Status {
        Status {
            status: "Failure".into(),
            message: message.to_owned(),
            reason: "InternalError".into(),
            ..Default::default()
        }
    }

    /// The exit code it carries: 0 for Success, the ExitCode cause, or None for another
    /// failure.
    pub fn exit_code(&self) -> Option<i32> {
        if self.status == "Success" {
            return Some(0);
        }
        self.details
            .as_ref()?
            .causes
            .iter()
            .find(|c| c.reason == "ExitCode")?
            .message
            .parse()
            .ok()
    }

    /// JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Picks the first of the client's `offered` protocols that the server `supported`.
pub fn negotiate<'a>(offered: &[&str], supported: &[&'a str]) -> Option<&'a str> {
    offered
        .iter()
        .flat_map(|o| o.split(','))
        .map(str::trim)
        .find_map(|o| supported.iter().find(|s| **s == o).copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_round_trips() {
        let s = Status::exit(7);
        let back: Status = serde_json::from_slice(&s.to_json()).unwrap();
        assert_eq!(back.exit_code(), Some(7));
        assert_eq!(Status::exit(0).exit_code(), Some(0));
        assert_eq!(Status::internal("x").exit_code(), None);
    }

    #[test]
    fn sizes_split_across_chunks() {
        let mut b = br#"{"Width":80,"Height":24}{"Width":1"#.to_vec();
        assert_eq!(
            parse_sizes(&mut b).unwrap(),
            vec![TerminalSize {
                width: 80,
                height: 24
            }]
        );
        b.extend_from_slice(br#"00,"Height":50}"#);
        assert_eq!(parse_sizes(&mut b).unwrap()[0].width, 100);
        assert!(b.is_empty());
        let mut bad = b"{nope}".to_vec();
        assert!(parse_sizes(&mut bad).is_err());
    }

    #[test]
    fn negotiation_follows_the_client() {
        assert_eq!(
            negotiate(&["v4.channel.k8s.io", V5], &SPDY_REMOTECOMMAND),
            Some(V4)
        );
        assert_eq!(
            negotiate(&["x, v2.channel.k8s.io"], &SPDY_REMOTECOMMAND),
            Some(V2)
        );
        assert_eq!(negotiate(&["x"], &SPDY_REMOTECOMMAND), None);
    }
}
