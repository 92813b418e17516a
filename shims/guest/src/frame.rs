//! Framing of guest API messages on a byte stream: a 4-byte big-endian length, then that
//! many bytes of one protobuf message. Shared by the guest agent and the host's client.

use std::io::{self, Read, Write};

/// Largest frame either side accepts; a bigger length means a corrupt stream.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// Errors reading a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended in the middle of a frame.
    #[error("channel i/o: {0}")]
    Io(#[from] io::Error),
    /// The length prefix exceeds [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    /// The payload is not a valid message.
    #[error("undecodable message: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Writes `msg` as one frame and flushes.
pub fn write_frame<W: Write, M: prost::Message>(w: &mut W, msg: &M) -> io::Result<()> {
    let len = msg.encoded_len();
    let prefix = u32::try_from(len)
        .ok()
        .filter(|l| (*l as usize) <= MAX_FRAME_BYTES)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "message too large"))?;
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&prefix.to_be_bytes());
    msg.encode(&mut buf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one frame. `Ok(None)` is a clean end of stream before any byte of a frame.
pub fn read_frame<R: Read, M: prost::Message + Default>(
    r: &mut R,
) -> Result<Option<M>, FrameError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < prefix.len() {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some(M::decode(payload.as_slice())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use isola_proto::guest::{request, HelloRequest, Request};

    #[test]
    fn round_trip_and_eof() {
        let msg = Request {
            id: 7,
            kind: Some(request::Kind::Hello(HelloRequest { api_version: 1 })),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &msg).unwrap();
        write_frame(&mut buf, &msg).unwrap();
        let mut r = buf.as_slice();
        assert_eq!(read_frame::<_, Request>(&mut r).unwrap(), Some(msg.clone()));
        assert_eq!(read_frame::<_, Request>(&mut r).unwrap(), Some(msg));
        assert_eq!(read_frame::<_, Request>(&mut r).unwrap(), None);
    }

    #[test]
    fn rejects_truncated_and_huge_frames() {
        let mut r: &[u8] = &[0, 0, 0, 5, 1];
        assert!(matches!(
            read_frame::<_, Request>(&mut r),
            Err(FrameError::Io(_))
        ));
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame::<_, Request>(&mut r),
            Err(FrameError::TooLarge(_))
        ));
    }
}
