//! SPDY/3 name/value header blocks: the layout of a decompressed block, and the two zlib
//! streams (one a direction, both primed with [`DICTIONARY`]) that carry them.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::dictionary::DICTIONARY;

/// Largest decompressed header block accepted (a zip bomb stops here).
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// Most name/value pairs accepted in one block.
pub const MAX_HEADER_PAIRS: u32 = 1024;

/// Header block errors.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The zlib stream was corrupt.
    #[error("header block: zlib: {0}")]
    Zlib(String),
    /// The block decompressed to more than [`MAX_HEADER_BLOCK`] bytes.
    #[error("header block larger than {MAX_HEADER_BLOCK} bytes")]
    TooLarge,
    /// The block's layout was wrong.
    #[error("header block: {0}")]
    Malformed(&'static str),
}

/// A header block: names (lower case on the wire) with their values. A value holding
/// several values separates them with NUL bytes, as SPDY/3 does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// An empty block.
    pub fn new() -> Headers {
        Headers(Vec::new())
    }

    /// Adds a pair (the name is lower-cased, as SPDY/3 requires).
    pub fn with(mut self, name: &str, value: &str) -> Headers {
        self.0.push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split('\0').next().unwrap_or(""))
    }

    /// Encodes the uncompressed block.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.0.len() as u32).to_be_bytes());
        for (n, v) in &self.0 {
            out.extend_from_slice(&(n.len() as u32).to_be_bytes());
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }

    /// Decodes an uncompressed block.
    pub fn decode(mut b: &[u8]) -> Result<Headers, HeaderError> {
        fn u32_of(b: &mut &[u8]) -> Result<u32, HeaderError> {
            let (head, rest) = b
                .split_first_chunk::<4>()
                .ok_or(HeaderError::Malformed("truncated length"))?;
            *b = rest;
            Ok(u32::from_be_bytes(*head))
        }
        fn str_of(b: &mut &[u8]) -> Result<String, HeaderError> {
            let n = u32_of(b)? as usize;
            if n > b.len() {
                return Err(HeaderError::Malformed("string longer than the block"));
            }
            let (s, rest) = b.split_at(n);
            *b = rest;
            String::from_utf8(s.to_vec()).map_err(|_| HeaderError::Malformed("string not UTF-8"))
        }
        let pairs = u32_of(&mut b)?;
        if pairs > MAX_HEADER_PAIRS {
            return Err(HeaderError::Malformed("too many pairs"));
        }
        let mut out = Vec::with_capacity(pairs as usize);
        for _ in 0..pairs {
            let n = str_of(&mut b)?;
            if n.is_empty() {
                return Err(HeaderError::Malformed("empty header name"));
            }
            let v = str_of(&mut b)?;
            out.push((n, v));
        }
        Ok(Headers(out))
    }
}

/// The compressing side of one direction of a session.
pub struct Deflater(Compress);

impl Default for Deflater {
    fn default() -> Self {
        Deflater::new()
    }
}

impl Deflater {
    /// A zlib stream primed with the SPDY dictionary.
    pub fn new() -> Deflater {
        let mut c = Compress::new(Compression::default(), true);
        // Cannot fail on a fresh stream.
        let _ = c.set_dictionary(&DICTIONARY);
        Deflater(c)
    }

    /// Compresses one block, ending at a sync flush point so that the peer can decode it
    /// whole.
    pub fn compress(&mut self, block: &[u8]) -> Result<Vec<u8>, HeaderError> {
        let mut out = Vec::with_capacity(block.len() / 2 + 64);
        let mut input = block;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(1024);
            }
            let before = self.0.total_in();
            self.0
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| HeaderError::Zlib(e.to_string()))?;
            let used = (self.0.total_in() - before) as usize;
            input = &input[used..];
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

/// The decompressing side of one direction of a session.
pub struct Inflater(Decompress);

impl Default for Inflater {
    fn default() -> Self {
        Inflater::new()
    }
}

impl Inflater {
    /// A zlib stream that takes the SPDY dictionary when the stream asks for it.
    pub fn new() -> Inflater {
        Inflater(Decompress::new(true))
    }

    /// Decompresses one block (everything up to its sync flush point).
    pub fn decompress(&mut self, block: &[u8]) -> Result<Vec<u8>, HeaderError> {
        let mut out = Vec::with_capacity(block.len() * 2 + 64);
        let mut input = block;
        loop {
            if out.capacity() - out.len() < 256 {
                out.reserve(4096);
            }
            let (in0, out0) = (self.0.total_in(), self.0.total_out());
            let r = self
                .0
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            input = &input[(self.0.total_in() - in0) as usize..];
            let progressed = self.0.total_in() != in0 || self.0.total_out() != out0;
            if out.len() > MAX_HEADER_BLOCK {
                return Err(HeaderError::TooLarge);
            }
            match r {
                Ok(Status::StreamEnd) => {
                    return Err(HeaderError::Zlib("the peer ended its zlib stream".into()))
                }
                Ok(_) => {
                    if input.is_empty() && out.len() < out.capacity() {
                        return Ok(out);
                    }
                    if !progressed {
                        return Err(HeaderError::Zlib("truncated header block".into()));
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.0
                        .set_dictionary(&DICTIONARY)
                        .map_err(|e| HeaderError::Zlib(e.to_string()))?;
                }
                Err(e) => return Err(HeaderError::Zlib(e.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_over_one_stream() {
        let mut d = Deflater::new();
        let mut i = Inflater::new();
        for n in 0..5 {
            let h = Headers::new()
                .with("streamType", "stdout")
                .with("port", &format!("{n}"))
                .with("requestid", "0");
            let z = d.compress(&h.encode()).unwrap();
            let back = Headers::decode(&i.decompress(&z).unwrap()).unwrap();
            assert_eq!(back, h);
            assert_eq!(back.get("StreamType"), Some("stdout"));
        }
    }

    #[test]
    fn the_dictionary_id_is_spdy3s() {
        let mut d = Deflater::new();
        let z = d.compress(&Headers::new().encode()).unwrap();
        // FDICT set, and the dictionary id is the Adler-32 of the SPDY/3 dictionary.
        assert_eq!(z[1] & 0x20, 0x20);
        assert_eq!(&z[2..6], &[0xe3, 0xc6, 0xa7, 0xc2]);
        let mut i = Inflater::new();
        assert_eq!(
            Headers::decode(&i.decompress(&z).unwrap()).unwrap(),
            Headers::new()
        );
    }

    #[test]
    fn blocks_from_another_zlib_decode() {
        // Two blocks from C zlib (level 9, the SPDY dictionary, a sync flush after
        // each), as Go's spdy framer writes them: the second refers back to the first.
        let z1 = [
            0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2, 0x02, 0x25, 0x3a, 0x70, 0x3a, 0x2b, 0x29, 0x4a,
            0x4d, 0xcc, 0x85, 0x16, 0x25, 0xac, 0xa9, 0xa0, 0x80, 0x86, 0x14, 0xcb, 0x45, 0xe0,
            0x1c, 0x60, 0x61, 0x60, 0x61, 0x00, 0xa4, 0x39, 0x8b, 0x20, 0xd1, 0x98, 0x09, 0x4a,
            0xde, 0x8c, 0x06, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff,
        ];
        let z2 = [
            0xc2, 0xaa, 0x19, 0x54, 0x0e, 0x25, 0x12, 0xd6, 0x0b, 0x00, 0x00, 0x00, 0xff, 0xff,
        ];
        let mut i = Inflater::new();
        let h1 = Headers::decode(&i.decompress(&z1).unwrap()).unwrap();
        let h2 = Headers::decode(&i.decompress(&z2).unwrap()).unwrap();
        assert_eq!(h1.get("streamType"), Some("error"));
        assert_eq!(h1.get("port"), Some("8080"));
        assert_eq!(h2.get("streamtype"), Some("data"));
        assert_eq!(h2.get("requestID"), Some("0"));
    }

    #[test]
    fn garbage_is_an_error() {
        let mut i = Inflater::new();
        assert!(i.decompress(&[0x78, 0xbb, 1, 2, 3, 4, 5, 6]).is_err());
        assert!(Headers::decode(&[0, 0, 0, 1, 0, 0, 0, 9, b'a']).is_err());
        assert!(Headers::decode(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
