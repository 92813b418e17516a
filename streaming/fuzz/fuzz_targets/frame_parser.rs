//! Feeds arbitrary bytes to the SPDY frame parser (header blocks included): it must
//! return frames or errors, never panic or loop.
#![no_main]

use bytes::BytesMut;
use isola_streaming::spdy::frame::FrameReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = FrameReader::new();
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = r.parse(&mut buf) {}
});
