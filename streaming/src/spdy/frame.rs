//! SPDY/3.1 frames: parsing from a byte buffer (every length is checked; a malformed
//! frame is an error, never a panic) and encoding.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::headers::{Deflater, HeaderError, Headers, Inflater};

/// SPDY version spoken.
pub const VERSION: u16 = 3;
/// FLAG_FIN: the sender's last frame on the stream.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL on SYN_STREAM.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// Largest frame payload accepted (SPDY's 24-bit length allows 16 MiB).
pub const MAX_FRAME_PAYLOAD: usize = 1 << 24;
/// Largest control frame payload accepted (header blocks are small).
pub const MAX_CONTROL_PAYLOAD: usize = 1 << 20;
/// Largest data payload we send in one frame.
pub const MAX_DATA_CHUNK: usize = 32 * 1024;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// RST_STREAM status codes used here.
pub mod rst {
    /// PROTOCOL_ERROR.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// INVALID_STREAM.
    pub const INVALID_STREAM: u32 = 2;
    /// REFUSED_STREAM.
    pub const REFUSED_STREAM: u32 = 3;
    /// CANCEL.
    pub const CANCEL: u32 = 5;
    /// STREAM_IN_USE.
    pub const STREAM_IN_USE: u32 = 8;
}

/// Frame errors: the session cannot go on after one of them.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A control frame of another SPDY version.
    #[error("unsupported SPDY version {0}")]
    Version(u16),
    /// A frame's payload is shorter than its type needs, or too long.
    #[error("malformed {kind} frame: {what}")]
    Malformed {
        /// The frame type.
        kind: &'static str,
        /// What was wrong.
        what: &'static str,
    },
    /// A header block could not be read.
    #[error(transparent)]
    Headers(#[from] HeaderError),
}

fn malformed(kind: &'static str, what: &'static str) -> FrameError {
    FrameError::Malformed { kind, what }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Opens a stream.
    SynStream {
        /// The new stream (odd from the client, even from the server).
        stream_id: u32,
        /// Associated stream (0: none).
        associated_id: u32,
        /// Priority 0 (highest) to 7.
        priority: u8,
        /// FIN and UNIDIRECTIONAL.
        flags: u8,
        /// Its headers.
        headers: Headers,
    },
    /// Accepts a stream.
    SynReply {
        /// The stream.
        stream_id: u32,
        /// FIN.
        flags: u8,
        /// Reply headers.
        headers: Headers,
    },
    /// Aborts a stream.
    RstStream {
        /// The stream.
        stream_id: u32,
        /// Why.
        status: u32,
    },
    /// Session settings (id, value); flags dropped.
    Settings(Vec<(u32, u32)>),
    /// Liveness check, echoed by the receiver.
    Ping(u32),
    /// The sender ends the session.
    GoAway {
        /// The last stream the sender took.
        last_good_stream_id: u32,
        /// Why.
        status: u32,
    },
    /// More headers on a stream.
    Headers {
        /// The stream.
        stream_id: u32,
        /// FIN.
        flags: u8,
        /// The headers.
        headers: Headers,
    },
    /// Grants the peer more send window.
    WindowUpdate {
        /// The stream (0: session).
        stream_id: u32,
        /// Bytes granted.
        delta: u32,
    },
    /// Stream data.
    Data {
        /// The stream.
        stream_id: u32,
        /// FIN.
        flags: u8,
        /// Payload.
        data: Bytes,
    },
}

impl Frame {
    /// Whether the frame carries FLAG_FIN.
    pub fn is_fin(&self) -> bool {
        match self {
            Frame::SynStream { flags, .. }
            | Frame::SynReply { flags, .. }
            | Frame::Headers { flags, .. }
            | Frame::Data { flags, .. } => flags & FLAG_FIN != 0,
            _ => false,
        }
    }
}

/// Reads frames; owns the inflating side of the session's header compression.
#[derive(Default)]
pub struct FrameReader {
    inflater: Inflater,
}

fn be32(b: &[u8], kind: &'static str) -> Result<u32, FrameError> {
    b.get(..4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| malformed(kind, "payload too short"))
}

impl FrameReader {
    /// A reader at the start of a session.
    pub fn new() -> FrameReader {
        FrameReader::default()
    }

    /// Takes one whole frame off the front of `buf`, or None when more bytes are needed.
    pub fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let len = (u32::from_be_bytes([0, buf[5], buf[6], buf[7]])) as usize;
        // A control frame's head is checked before its payload is awaited: a peer that
        // speaks something else must not keep the session waiting for 16 MiB.
        if buf[0] & 0x80 != 0 {
            let version = u16::from_be_bytes([buf[0] & 0x7f, buf[1]]);
            if version != VERSION {
                return Err(FrameError::Version(version));
            }
            if len > MAX_CONTROL_PAYLOAD {
                return Err(malformed("control", "length over the limit"));
            }
        }
        if len > MAX_FRAME_PAYLOAD {
            return Err(malformed("any", "length over the limit"));
        }
        if buf.len() < 8 + len {
            buf.reserve(8 + len - buf.len());
            return Ok(None);
        }
        let head = buf.split_to(8);
        let payload = buf.split_to(len).freeze();
        let flags = head[4];
        if head[0] & 0x80 == 0 {
            let stream_id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            return Ok(Some(Frame::Data {
                stream_id,
                flags,
                data: payload,
            }));
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        self.control(kind, flags, payload).map(Some)
    }

    fn control(&mut self, kind: u16, flags: u8, p: Bytes) -> Result<Frame, FrameError> {
        let id31 = |b: &[u8], k| be32(b, k).map(|v| v & 0x7fff_ffff);
        Ok(match kind {
            SYN_STREAM => {
                let k = "SYN_STREAM";
                if p.len() < 10 {
                    return Err(malformed(k, "payload too short"));
                }
                let stream_id = id31(&p[0..4], k)?;
                let associated_id = id31(&p[4..8], k)?;
                let priority = p[8] >> 5;
                let headers = self.headers(&p[10..])?;
                if stream_id == 0 {
                    return Err(malformed(k, "stream id 0"));
                }
                Frame::SynStream {
                    stream_id,
                    associated_id,
                    priority,
                    flags,
                    headers,
                }
            }
            SYN_REPLY | HEADERS => {
                let k = if kind == SYN_REPLY {
                    "SYN_REPLY"
                } else {
                    "HEADERS"
                };
                let stream_id = id31(&p, k)?;
                let headers = self.headers(&p[4..])?;
                if kind == SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        flags,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        flags,
                        headers,
                    }
                }
            }
            RST_STREAM => {
                let k = "RST_STREAM";
                if p.len() != 8 {
                    return Err(malformed(k, "payload is not 8 bytes"));
                }
                Frame::RstStream {
                    stream_id: id31(&p[0..4], k)?,
                    status: be32(&p[4..8], k)?,
                }
            }
            SETTINGS => {
                let k = "SETTINGS";
                let n = be32(&p, k)? as usize;
                if p.len() != 4 + n.checked_mul(8).ok_or_else(|| malformed(k, "count"))? {
                    return Err(malformed(k, "count does not match the length"));
                }
                let mut entries = Vec::with_capacity(n);
                let mut b = &p[4..];
                while b.len() >= 8 {
                    let id = b.get_u32() & 0x00ff_ffff;
                    let value = b.get_u32();
                    entries.push((id, value));
                }
                Frame::Settings(entries)
            }
            PING => {
                if p.len() != 4 {
                    return Err(malformed("PING", "payload is not 4 bytes"));
                }
                Frame::Ping(be32(&p, "PING")?)
            }
            GOAWAY => {
                let k = "GOAWAY";
                if p.len() != 8 {
                    return Err(malformed(k, "payload is not 8 bytes"));
                }
                Frame::GoAway {
                    last_good_stream_id: id31(&p[0..4], k)?,
                    status: be32(&p[4..8], k)?,
                }
            }
            WINDOW_UPDATE => {
                let k = "WINDOW_UPDATE";
                if p.len() != 8 {
                    return Err(malformed(k, "payload is not 8 bytes"));
                }
                Frame::WindowUpdate {
                    stream_id: id31(&p[0..4], k)?,
                    delta: id31(&p[4..8], k)?,
                }
            }
            _ => return Err(malformed("unknown", "unknown control frame type")),
        })
    }

    fn headers(&mut self, block: &[u8]) -> Result<Headers, FrameError> {
        // An empty block is legal when no headers were compressed.
        if block.is_empty() {
            return Ok(Headers::new());
        }
        Ok(Headers::decode(&self.inflater.decompress(block)?)?)
    }
}

/// Writes frames; owns the deflating side of the session's header compression.
#[derive(Default)]
pub struct FrameWriter {
    deflater: Deflater,
}

fn control_head(out: &mut BytesMut, kind: u16, flags: u8, len: usize) {
    out.put_u16(0x8000 | VERSION);
    out.put_u16(kind);
    out.put_u32(((flags as u32) << 24) | (len as u32 & 0x00ff_ffff));
}

impl FrameWriter {
    /// A writer at the start of a session.
    pub fn new() -> FrameWriter {
        FrameWriter::default()
    }

    /// Appends the encoding of `frame` to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), FrameError> {
        match frame {
            Frame::SynStream {
                stream_id,
                associated_id,
                priority,
                flags,
                headers,
            } => {
                let block = self.deflater.compress(&headers.encode())?;
                control_head(out, SYN_STREAM, *flags, 10 + block.len());
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32(associated_id & 0x7fff_ffff);
                out.put_u8((priority & 7) << 5);
                out.put_u8(0);
                out.put_slice(&block);
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            }
            | Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                let kind = if matches!(frame, Frame::SynReply { .. }) {
                    SYN_REPLY
                } else {
                    HEADERS
                };
                let block = self.deflater.compress(&headers.encode())?;
                control_head(out, kind, *flags, 4 + block.len());
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_slice(&block);
            }
            Frame::RstStream { stream_id, status } => {
                control_head(out, RST_STREAM, 0, 8);
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32(*status);
            }
            Frame::Settings(entries) => {
                control_head(out, SETTINGS, 0, 4 + 8 * entries.len());
                out.put_u32(entries.len() as u32);
                for (id, v) in entries {
                    out.put_u32(id & 0x00ff_ffff);
                    out.put_u32(*v);
                }
            }
            Frame::Ping(id) => {
                control_head(out, PING, 0, 4);
                out.put_u32(*id);
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                control_head(out, GOAWAY, 0, 8);
                out.put_u32(last_good_stream_id & 0x7fff_ffff);
                out.put_u32(*status);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                control_head(out, WINDOW_UPDATE, 0, 8);
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32(delta & 0x7fff_ffff);
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if data.len() >= MAX_FRAME_PAYLOAD {
                    return Err(malformed("DATA", "payload over 16 MiB"));
                }
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32(((*flags as u32) << 24) | data.len() as u32);
                out.put_slice(data);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frames: &[Frame]) {
        let mut w = FrameWriter::new();
        let mut r = FrameReader::new();
        let mut buf = BytesMut::new();
        for f in frames {
            w.encode(f, &mut buf).unwrap();
        }
        // Fed a byte at a time, the reader waits for whole frames.
        let mut feed = BytesMut::new();
        let mut got = Vec::new();
        for b in buf.iter() {
            feed.put_u8(*b);
            while let Some(f) = r.parse(&mut feed).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn frames_round_trip() {
        let h = Headers::new()
            .with("streamtype", "error")
            .with("port", "80");
        round_trip(&[
            Frame::SynStream {
                stream_id: 1,
                associated_id: 0,
                priority: 0,
                flags: 0,
                headers: h.clone(),
            },
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: Headers::new(),
            },
            Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Settings(vec![(7, 65536), (4, 100)]),
            Frame::Ping(9),
            Frame::WindowUpdate {
                stream_id: 1,
                delta: 5,
            },
            Frame::RstStream {
                stream_id: 3,
                status: rst::CANCEL,
            },
            Frame::Headers {
                stream_id: 3,
                flags: 0,
                headers: h,
            },
            Frame::GoAway {
                last_good_stream_id: 3,
                status: 0,
            },
        ]);
    }

    /// A small stand-in for the fuzz target that runs with the unit tests: mutated
    /// valid frames and random bytes give frames or errors, never a panic.
    #[test]
    fn mutated_frames_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut w = FrameWriter::new();
        let mut valid = BytesMut::new();
        for f in [
            Frame::SynStream {
                stream_id: 1,
                associated_id: 0,
                priority: 0,
                flags: 0,
                headers: Headers::new().with("streamtype", "data").with("port", "80"),
            },
            Frame::Settings(vec![(7, 1)]),
            Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"abc"),
            },
        ] {
            w.encode(&f, &mut valid).unwrap();
        }
        for round in 0..20_000 {
            let mut input = valid.to_vec();
            if round % 4 == 0 {
                input = (0..(next() % 96) as usize).map(|_| next() as u8).collect();
            } else {
                for _ in 0..1 + next() % 4 {
                    let i = (next() as usize) % input.len();
                    input[i] = next() as u8;
                }
            }
            let mut r = FrameReader::new();
            let mut buf = BytesMut::from(&input[..]);
            while let Ok(Some(_)) = r.parse(&mut buf) {}
        }
    }

    #[test]
    fn malformed_frames_are_errors() {
        let mut r = FrameReader::new();
        for bad in [
            // version 2
            &[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1][..],
            // PING with 3 bytes
            &[0x80, 3, 0, 6, 0, 0, 0, 3, 0, 0, 1][..],
            // SETTINGS count beyond the payload
            &[0x80, 3, 0, 4, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff][..],
            // SYN_STREAM with a garbage header block
            &[
                0x80, 3, 0, 1, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2,
            ][..],
            // unknown type
            &[0x80, 3, 0, 99, 0, 0, 0, 0][..],
            // another version, with a payload that never comes
            &[0x80, 7, 0, 1, 0xff, 0xff, 0xff, 0xff][..],
            // a control frame longer than any header block
            &[0x80, 3, 0, 1, 0, 0x7f, 0xff, 0xff][..],
        ] {
            let mut b = BytesMut::from(bad);
            assert!(r.parse(&mut b).is_err(), "{bad:?}");
        }
    }
}
