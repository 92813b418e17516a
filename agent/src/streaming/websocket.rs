//! The WebSocket forms of remotecommand (`v4`/`v5.channel.k8s.io` and their `base64.`
//! variants: every message is a channel byte and data) and of port-forward (two
//! channels a port, data then error, each opened by the port number in little endian).

use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use isola_proto::shim as sp;
use isola_streaming::channel::{self, Status};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use super::remotecommand::{run_process, Output};
use super::{portforward, Request};
use crate::runtime::Runtime;

type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Frames channel messages for one subprotocol.
#[derive(Clone, Copy)]
struct Codec {
    base64: bool,
}

impl Codec {
    fn of(protocol: &str) -> Codec {
        Codec {
            base64: protocol.starts_with("base64."),
        }
    }

    fn encode(self, ch: u8, data: &[u8]) -> Message {
        if self.base64 {
            let mut s = String::with_capacity(1 + data.len() * 4 / 3 + 4);
            s.push((b'0' + ch) as char);
            s.push_str(&base64::engine::general_purpose::STANDARD.encode(data));
            Message::Text(s.into())
        } else {
            let mut v = Vec::with_capacity(1 + data.len());
            v.push(ch);
            v.extend_from_slice(data);
            Message::Binary(v.into())
        }
    }

    /// (channel, data), or None for a message to skip.
    fn decode(self, m: Message) -> Option<(u8, Vec<u8>)> {
        match m {
            Message::Binary(b) if !self.base64 => {
                let (ch, rest) = b.split_first()?;
                Some((*ch, rest.to_vec()))
            }
            Message::Text(t) if self.base64 => {
                let bytes = t.as_bytes();
                let (ch, rest) = bytes.split_first()?;
                // Channel 255 (v5 close) wraps around to '/'.
                let ch = ch.wrapping_sub(b'0');
                let data = base64::engine::general_purpose::STANDARD
                    .decode(rest)
                    .ok()?;
                Some((ch, data))
            }
            _ => None,
        }
    }
}

async fn accept(io: TokioIo<Upgraded>) -> Ws {
    WebSocketStream::from_raw_socket(io, Role::Server, None).await
}

fn input_of(kind: sp::stream_input::Kind) -> sp::StreamInput {
    sp::StreamInput { kind: Some(kind) }
}

/// Serves one exec or attach over an upgraded WebSocket.
pub async fn serve_remotecommand(
    rt: Arc<Runtime>,
    req: Request,
    protocol: &'static str,
    io: TokioIo<Upgraded>,
) {
    let codec = Codec::of(protocol);
    let v5 = protocol.ends_with(channel::V5);
    let (mut sink, mut stream) = accept(io).await.split();
    let (in_tx, in_rx) = mpsc::channel(64);
    let (gone_tx, mut gone) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _gone = gone_tx;
        let mut sizes = Vec::new();
        while let Some(Ok(m)) = stream.next().await {
            if m.is_close() {
                break;
            }
            let Some((ch, data)) = codec.decode(m) else {
                continue;
            };
            let msg = match ch {
                channel::CH_STDIN => input_of(sp::stream_input::Kind::Stdin(data)),
                channel::CH_RESIZE => {
                    sizes.extend_from_slice(&data);
                    let Ok(parsed) = channel::parse_sizes(&mut sizes) else {
                        debug!("malformed terminal size");
                        sizes.clear();
                        continue;
                    };
                    for s in parsed {
                        let r = sp::Resize {
                            width: s.width as u32,
                            height: s.height as u32,
                        };
                        if in_tx
                            .send(input_of(sp::stream_input::Kind::Resize(r)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    continue;
                }
                channel::CH_CLOSE if v5 && data.first() == Some(&channel::CH_STDIN) => {
                    input_of(sp::stream_input::Kind::StdinClose(true))
                }
                _ => continue,
            };
            if in_tx.send(msg).await.is_err() {
                return;
            }
        }
        let _ = in_tx
            .send(input_of(sp::stream_input::Kind::StdinClose(true)))
            .await;
        // The client is gone: `_gone` drops here and wakes the output loop.
    });
    let mut out = run_process(&rt, &req, in_rx).await;
    let mut status = Status::internal("the process output ended without a status");
    loop {
        let o = tokio::select! {
            o = out.recv() => match o {
                Some(o) => o,
                None => break,
            },
            _ = gone.changed() => return,
        };
        let m = match o {
            Output::Stdout(b) => codec.encode(channel::CH_STDOUT, &b),
            Output::Stderr(b) => codec.encode(channel::CH_STDERR, &b),
            Output::Exit(code) => {
                status = Status::exit(code);
                break;
            }
            Output::Failed(m) => {
                status = Status::internal(&m);
                break;
            }
        };
        if sink.send(m).await.is_err() {
            return;
        }
    }
    let _ = sink
        .send(codec.encode(channel::CH_ERROR, &status.to_json()))
        .await;
    let _ = sink.send(Message::Close(None)).await;
    let _ = sink.close().await;
}

/// Serves port-forward over an upgraded WebSocket for the `ports` of the URL's query.
pub async fn serve_port_forward(
    rt: Arc<Runtime>,
    sandbox_id: String,
    ports: Vec<u16>,
    protocol: &'static str,
    io: TokioIo<Upgraded>,
) {
    let codec = Codec::of(protocol);
    let (mut sink, mut stream) = accept(io).await.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(64);
    let mut to_pod = Vec::new();
    let mut tasks = Vec::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let (data_ch, err_ch) = ((2 * i) as u8, (2 * i + 1) as u8);
        for ch in [data_ch, err_ch] {
            let _ = out_tx.send(codec.encode(ch, &port.to_le_bytes())).await;
        }
        let (in_tx, in_rx) = mpsc::channel::<Bytes>(64);
        to_pod.push(in_tx);
        let (back_tx, mut back_rx) = mpsc::channel::<Bytes>(64);
        let out = out_tx.clone();
        let copy = tokio::spawn(async move {
            while let Some(b) = back_rx.recv().await {
                if out.send(codec.encode(data_ch, &b)).await.is_err() {
                    return;
                }
            }
        });
        let rt = rt.clone();
        let sb = sandbox_id.clone();
        let out = out_tx.clone();
        tasks.push(tokio::spawn(async move {
            let r = portforward::forward(&rt, &sb, port, in_rx, back_tx).await;
            let _ = copy.await;
            if let Err(m) = r {
                let _ = out.send(codec.encode(err_ch, m.as_bytes())).await;
            }
        }));
    }
    drop(out_tx);
    tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            if m.is_close() {
                break;
            }
            let Some((ch, data)) = codec.decode(m) else {
                continue;
            };
            if ch % 2 == 0 {
                if let Some(tx) = to_pod.get(ch as usize / 2) {
                    let _ = tx.send(data.into()).await;
                }
            }
        }
        // The client is done sending: half-close every connection.
        drop(to_pod);
    });
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if sink.send(m).await.is_err() {
                return;
            }
        }
        let _ = sink.send(Message::Close(None)).await;
        let _ = sink.close().await;
    });
    for t in tasks {
        let _ = t.await;
    }
    let _ = writer.await;
}
