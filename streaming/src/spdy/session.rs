//! A SPDY/3.1 session over one connection: a reader task that routes frames to streams,
//! a writer task that owns the compressor, and handles to open, read, write and close
//! streams. The server side answers every SYN_STREAM with a SYN_REPLY and hands the new
//! stream to its owner; the client side opens streams and waits for their replies.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::frame::{rst, Frame, FrameError, FrameReader, FrameWriter, FLAG_FIN, MAX_DATA_CHUNK};
use super::headers::Headers;

/// Most bytes queued for streams whose owners do not read; beyond, the session ends.
const MAX_QUEUED: usize = 16 << 20;

/// Session errors.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The session is over.
    #[error("the SPDY session is closed")]
    Closed,
    /// The peer did not answer a SYN_STREAM in time.
    #[error("no SYN_REPLY for stream {0} in time")]
    NoReply(u32),
    /// The peer reset the stream.
    #[error("stream {0} was reset by the peer")]
    Reset(u32),
    /// A frame was malformed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

struct StreamSlot {
    data: mpsc::UnboundedSender<Bytes>,
}

struct Shared {
    streams: Mutex<HashMap<u32, StreamSlot>>,
    replies: Mutex<HashMap<u32, oneshot::Sender<Headers>>>,
    queued: AtomicU32,
    next_id: AtomicU32,
    // Turns true when the peer's side of the connection ended.
    done: tokio::sync::watch::Sender<bool>,
}

/// A handle on a session (cheap to clone).
#[derive(Clone)]
pub struct Session {
    out: mpsc::Sender<Frame>,
    shared: Arc<Shared>,
}

/// One stream: its headers, the data the peer sends on it, and a way to send.
pub struct Stream {
    /// The stream id.
    pub id: u32,
    /// The headers of its SYN_STREAM.
    pub headers: Headers,
    rx: mpsc::UnboundedReceiver<Bytes>,
    session: Session,
}

impl Stream {
    /// The next chunk the peer sent; None once the peer closed its side (FIN or reset)
    /// or the session ended.
    pub async fn read(&mut self) -> Option<Bytes> {
        let b = self.rx.recv().await?;
        self.session
            .shared
            .queued
            .fetch_sub(b.len() as u32, Ordering::Relaxed);
        // Grant the window back as the data is consumed.
        if !b.is_empty() {
            let _ = self
                .session
                .out
                .send(Frame::WindowUpdate {
                    stream_id: self.id,
                    delta: b.len() as u32,
                })
                .await;
        }
        Some(b)
    }

    /// A sender for this stream, usable from another task.
    pub fn writer(&self) -> StreamWriter {
        StreamWriter {
            id: self.id,
            out: self.session.out.clone(),
        }
    }
}

/// The sending half of a stream.
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    out: mpsc::Sender<Frame>,
}

impl StreamWriter {
    /// Sends data (split into frames of at most 32 KiB).
    pub async fn write(&self, data: &[u8]) -> Result<(), SessionError> {
        for chunk in data.chunks(MAX_DATA_CHUNK) {
            self.out
                .send(Frame::Data {
                    stream_id: self.id,
                    flags: 0,
                    data: Bytes::copy_from_slice(chunk),
                })
                .await
                .map_err(|_| SessionError::Closed)?;
        }
        Ok(())
    }

    /// Ends this side of the stream (an empty DATA frame with FIN).
    pub async fn close(&self) -> Result<(), SessionError> {
        self.out
            .send(Frame::Data {
                stream_id: self.id,
                flags: FLAG_FIN,
                data: Bytes::new(),
            })
            .await
            .map_err(|_| SessionError::Closed)
    }

    /// Aborts the stream.
    pub async fn reset(&self) {
        let _ = self
            .out
            .send(Frame::RstStream {
                stream_id: self.id,
                status: rst::CANCEL,
            })
            .await;
    }
}

impl Session {
    /// Starts a session over `io`. `server` picks the stream id parity (and whether
    /// incoming streams are accepted). Returns the handle and the streams the peer opens.
    pub fn start<T>(io: T, server: bool) -> (Session, mpsc::Receiver<Stream>)
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::channel::<Frame>(256);
        let (in_tx, in_rx) = mpsc::channel::<Stream>(64);
        let shared = Arc::new(Shared {
            streams: Mutex::new(HashMap::new()),
            replies: Mutex::new(HashMap::new()),
            queued: AtomicU32::new(0),
            next_id: AtomicU32::new(if server { 2 } else { 1 }),
            done: tokio::sync::watch::channel(false).0,
        });
        let session = Session {
            out: out_tx,
            shared,
        };
        tokio::spawn(write_loop(wr, out_rx));
        tokio::spawn(read_loop(rd, session.clone(), in_tx, server));
        (session, in_rx)
    }

    /// Opens a stream with `headers` and waits for the peer's SYN_REPLY.
    pub async fn open(&self, headers: Headers) -> Result<Stream, SessionError> {
        let id = self.shared.next_id.fetch_add(2, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        lock(&self.shared.streams).insert(id, StreamSlot { data: tx });
        lock(&self.shared.replies).insert(id, reply_tx);
        self.out
            .send(Frame::SynStream {
                stream_id: id,
                associated_id: 0,
                priority: 0,
                flags: 0,
                headers: headers.clone(),
            })
            .await
            .map_err(|_| SessionError::Closed)?;
        match tokio::time::timeout(Duration::from_secs(30), reply_rx).await {
            Ok(Ok(_)) => Ok(Stream {
                id,
                headers,
                rx,
                session: self.clone(),
            }),
            Ok(Err(_)) => Err(SessionError::Reset(id)),
            Err(_) => Err(SessionError::NoReply(id)),
        }
    }

    /// Ends the session: a GOAWAY, then the writer closes the connection once every
    /// handle is dropped.
    pub async fn go_away(&self) {
        let _ = self
            .out
            .send(Frame::GoAway {
                last_good_stream_id: 0,
                status: 0,
            })
            .await;
    }

    /// Resolves once the peer's side of the connection has ended (EOF, GOAWAY or a
    /// malformed frame).
    pub async fn closed(&self) {
        let mut rx = self.shared.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.out.is_closed()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn write_loop<W: AsyncWrite>(wr: W, mut rx: mpsc::Receiver<Frame>) {
    let mut wr = std::pin::pin!(wr);
    let mut fw = FrameWriter::new();
    let mut buf = BytesMut::new();
    while let Some(f) = rx.recv().await {
        let goaway = matches!(f, Frame::GoAway { .. });
        if let Err(e) = fw.encode(&f, &mut buf) {
            debug!(error = %e, "encoding a frame");
            break;
        }
        // Batch what is queued already into one write.
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(f) => {
                    if fw.encode(&f, &mut buf).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
            break;
        }
        buf.clear();
        if goaway {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

async fn read_loop<R: AsyncRead>(
    rd: R,
    session: Session,
    incoming: mpsc::Sender<Stream>,
    server: bool,
) {
    let mut rd = std::pin::pin!(rd);
    let mut fr = FrameReader::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let result: Result<(), SessionError> = async {
        loop {
            while let Some(frame) = fr.parse(&mut buf)? {
                if !handle(&session, &incoming, frame, server).await {
                    return Ok(());
                }
            }
            if rd.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(e) = result {
        debug!(error = %e, "SPDY session ended on an error");
        let _ = session
            .out
            .send(Frame::GoAway {
                last_good_stream_id: 0,
                status: 1,
            })
            .await;
    }
    lock(&session.shared.streams).clear();
    lock(&session.shared.replies).clear();
    session.shared.done.send_replace(true);
}

/// Routes one frame; false ends the session.
async fn handle(
    session: &Session,
    incoming: &mpsc::Sender<Stream>,
    frame: Frame,
    server: bool,
) -> bool {
    let shared = &session.shared;
    let fin = frame.is_fin();
    match frame {
        Frame::SynStream {
            stream_id, headers, ..
        } => {
            // Peers open odd ids toward a server, even ones toward a client.
            let valid_parity = (stream_id % 2 == 1) == server;
            if !valid_parity || lock(&shared.streams).contains_key(&stream_id) {
                let _ = session
                    .out
                    .send(Frame::RstStream {
                        stream_id,
                        status: if valid_parity {
                            rst::STREAM_IN_USE
                        } else {
                            rst::PROTOCOL_ERROR
                        },
                    })
                    .await;
                return true;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            if !fin {
                lock(&shared.streams).insert(stream_id, StreamSlot { data: tx });
            }
            let _ = session
                .out
                .send(Frame::SynReply {
                    stream_id,
                    flags: 0,
                    headers: Headers::new(),
                })
                .await;
            let s = Stream {
                id: stream_id,
                headers,
                rx,
                session: session.clone(),
            };
            if incoming.send(s).await.is_err() {
                let _ = session
                    .out
                    .send(Frame::RstStream {
                        stream_id,
                        status: rst::REFUSED_STREAM,
                    })
                    .await;
            }
        }
        Frame::SynReply {
            stream_id, headers, ..
        } => {
            if let Some(tx) = lock(&shared.replies).remove(&stream_id) {
                let _ = tx.send(headers);
            }
            if fin {
                lock(&shared.streams).remove(&stream_id);
            }
        }
        Frame::Headers { stream_id, .. } => {
            if fin {
                lock(&shared.streams).remove(&stream_id);
            }
        }
        Frame::Data {
            stream_id, data, ..
        } => {
            // None: unknown stream; Some(false): over the queue limit.
            let routed = {
                let mut streams = lock(&shared.streams);
                match streams.get(&stream_id) {
                    Some(slot) => {
                        let mut ok = true;
                        if !data.is_empty() {
                            let q = shared
                                .queued
                                .fetch_add(data.len() as u32, Ordering::Relaxed);
                            ok = (q as usize + data.len()) <= MAX_QUEUED;
                            let _ = slot.data.send(data);
                        }
                        if fin {
                            streams.remove(&stream_id);
                        }
                        Some(ok)
                    }
                    None => None,
                }
            };
            match routed {
                Some(true) => {}
                Some(false) => {
                    debug!("peer sent more than the stream owners read: ending the session");
                    return false;
                }
                None => {
                    let _ = session
                        .out
                        .send(Frame::RstStream {
                            stream_id,
                            status: rst::INVALID_STREAM,
                        })
                        .await;
                }
            }
        }
        Frame::RstStream { stream_id, .. } => {
            lock(&shared.streams).remove(&stream_id);
            lock(&shared.replies).remove(&stream_id);
        }
        Frame::Ping(id) => {
            // Echo the peer's pings (odd from clients, even from servers); ours come back.
            if (id % 2 == 1) == server {
                let _ = session.out.send(Frame::Ping(id)).await;
            }
        }
        Frame::GoAway { .. } => return false,
        Frame::Settings(_) | Frame::WindowUpdate { .. } => {}
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn client_and_server_exchange_data() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (_srv, mut incoming) = Session::start(a, true);
        let (cli, _none) = Session::start(b, false);
        let server = tokio::spawn(async move {
            let mut s = incoming.recv().await.unwrap();
            assert_eq!(s.headers.get("streamType"), Some("stdin"));
            let mut got = Vec::new();
            while let Some(b) = s.read().await {
                got.extend_from_slice(&b);
            }
            s.writer().write(&got).await.unwrap();
            s.writer().close().await.unwrap();
        });
        let mut s = cli
            .open(Headers::new().with("streamType", "stdin"))
            .await
            .unwrap();
        let w = s.writer();
        w.write(&vec![7u8; 100_000]).await.unwrap();
        w.close().await.unwrap();
        let mut back = Vec::new();
        while let Some(b) = s.read().await {
            back.extend_from_slice(&b);
        }
        assert_eq!(back, vec![7u8; 100_000]);
        server.await.unwrap();
    }
}
