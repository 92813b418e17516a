//! The CRI log format kubelet reads:
//! `2026-01-02T03:04:05.123456789Z stdout F text` — one record per line, `P` for a partial
//! line (a line longer than the buffer, or output without a final newline when the stream
//! ends is still written as `F`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Longest record content; longer lines are split into `P` records, as containerd does.
pub const MAX_RECORD: usize = 16 * 1024;

/// Which stream a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// RFC 3339 with nanoseconds, UTC, from the system clock.
pub fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format_timestamp(now.as_secs() as i64, now.subsec_nanos())
}

/// Formats seconds since the epoch and nanoseconds as `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
// Hand-written: the civil-from-days conversion is a few lines, and pulling a date crate
// into the static guest binary for it is not worth it.
pub fn format_timestamp(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Howard Hinnant's days → civil date.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{nanos:09}Z")
}

/// A container's CRI log file, shared by its stdout and stderr pumps.
pub struct LogWriter {
    path: PathBuf,
    file: Mutex<Option<File>>,
}

impl LogWriter {
    /// Opens (creating, appending) the log file and its directory.
    pub fn open(path: &Path) -> std::io::Result<Arc<LogWriter>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Arc::new(LogWriter {
            path: path.to_owned(),
            file: Mutex::new(Some(f)),
        }))
    }

    /// Reopens the file by path (after a rotation renamed the old one).
    pub fn reopen(&self) -> std::io::Result<()> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
        Ok(())
    }

    /// Writes one record.
    pub fn record(&self, stream: Stream, partial: bool, content: &[u8]) {
        let mut line = Vec::with_capacity(content.len() + 48);
        line.extend_from_slice(timestamp().as_bytes());
        line.push(b' ');
        line.extend_from_slice(stream.as_str().as_bytes());
        line.extend_from_slice(if partial { b" P " } else { b" F " });
        line.extend_from_slice(content);
        line.push(b'\n');
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = guard.as_mut() {
            // A full disk must not stop the container: the record is lost, not the pod.
            let _ = f.write_all(&line);
        }
    }
}

/// Copies a stream into the log until EOF, line by line. Runs on a thread of its own.
pub fn pump(mut reader: impl Read, stream: Stream, log: Arc<LogWriter>) {
    let mut buf = vec![0u8; MAX_RECORD];
    let mut filled = 0usize;
    loop {
        let n = match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        filled += n;
        let mut start = 0;
        while let Some(pos) = buf[start..filled].iter().position(|b| *b == b'\n') {
            log.record(stream, false, &buf[start..start + pos]);
            start += pos + 1;
        }
        if start == 0 && filled == buf.len() {
            log.record(stream, true, &buf[..filled]);
            filled = 0;
        } else {
            buf.copy_within(start..filled, 0);
            filled -= start;
        }
    }
    if filled > 0 {
        log.record(stream, false, &buf[..filled]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(format_timestamp(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            format_timestamp(1_767_323_045, 123_456_789),
            "2026-01-02T03:04:05.123456789Z"
        );
        assert_eq!(
            format_timestamp(951_782_400, 1),
            "2000-02-29T00:00:00.000000001Z"
        );
    }

    #[test]
    fn lines_partials_and_reopen() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("x/0.log");
        let log = LogWriter::open(&path).expect("open");
        let long = vec![b'a'; MAX_RECORD + 10];
        let mut input = b"hi\nthere\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nlast");
        pump(&input[..], Stream::Stdout, log.clone());
        pump(&b"err\n"[..], Stream::Stderr, log.clone());
        let text = std::fs::read_to_string(&path).expect("read");
        let recs: Vec<(&str, &str, &str)> = text
            .lines()
            .map(|l| {
                let mut it = l.splitn(4, ' ');
                let _ts = it.next().expect("ts");
                (
                    it.next().expect("stream"),
                    it.next().expect("tag"),
                    it.next().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(recs[0], ("stdout", "F", "hi"));
        assert_eq!(recs[1], ("stdout", "F", "there"));
        assert_eq!(recs[2].1, "P");
        assert_eq!(recs[2].2.len(), MAX_RECORD);
        assert_eq!(recs[3], ("stdout", "F", "aaaaaaaaaa"));
        assert_eq!(recs[4], ("stdout", "F", "last"));
        assert_eq!(recs[5], ("stderr", "F", "err"));
        std::fs::rename(&path, d.path().join("x/0.log.1")).expect("rotate");
        log.reopen().expect("reopen");
        log.record(Stream::Stdout, false, b"after");
        assert!(std::fs::read_to_string(&path)
            .expect("new")
            .contains("stdout F after"));
    }
}
