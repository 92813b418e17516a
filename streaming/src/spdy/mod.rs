//! SPDY/3.1 as Kubernetes uses it for exec, attach and port-forward: the framing
//! ([`frame`]), the zlib-compressed header blocks ([`headers`]) and a session that
//! multiplexes streams over one upgraded connection ([`session`]).
//!
//! Flow control: a receiver grants the peer's window back as soon as data arrives;
//! the peer's WINDOW_UPDATEs are accepted and not enforced on sending, as docker's
//! spdystream (the Go side of kubectl and kubelet) does.

pub mod dictionary;
pub mod frame;
pub mod headers;
pub mod session;

pub use frame::{Frame, FrameError};
pub use headers::Headers;
pub use session::{Session, SessionError, Stream};

/// The `Upgrade` token of a SPDY/3.1 connection.
pub const UPGRADE_TOKEN: &str = "SPDY/3.1";
