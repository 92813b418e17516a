//! Exec and attach: the Kubernetes remotecommand protocol (SPDY streams named by
//! `streamType`) joined to the shim's Exec/Attach stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use isola_proto::shim as sp;
use isola_streaming::channel::{self, parse_sizes, Status, StreamType};
use isola_streaming::spdy::{Session, Stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info};

use super::{Request, Streams};
use crate::runtime::Runtime;

/// How long the client has to open the streams it needs.
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// What the process sends back.
pub enum Output {
    /// stdout bytes.
    Stdout(Bytes),
    /// stderr bytes.
    Stderr(Bytes),
    /// The process (or container, for attach) exited with this code.
    Exit(i32),
    /// The process could not be run or followed.
    Failed(String),
}

fn streams_of(req: &Request) -> Streams {
    match req {
        Request::Exec { streams, .. } | Request::Attach { streams, .. } => *streams,
        Request::PortForward { .. } => Streams::default(),
    }
}

/// Starts the request's process in its shim; `input` feeds it, the output comes back on
/// the returned channel, ending with [`Output::Exit`] or [`Output::Failed`].
pub async fn run_process(
    rt: &Arc<Runtime>,
    req: &Request,
    input: mpsc::Receiver<sp::StreamInput>,
) -> mpsc::Receiver<Output> {
    let (tx, rx) = mpsc::channel(64);
    let started = start(rt, req, input).await;
    tokio::spawn(async move {
        let mut out = match started {
            Ok(o) => o,
            Err(e) => {
                let _ = tx.send(Output::Failed(e)).await;
                return;
            }
        };
        loop {
            let o = match out.message().await {
                Ok(Some(o)) => o,
                Ok(None) => {
                    let _ = tx
                        .send(Output::Failed(
                            "the shim ended the stream without an exit status".into(),
                        ))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx
                        .send(Output::Failed(format!("shim: {}", e.message())))
                        .await;
                    return;
                }
            };
            let msg = match o.kind {
                Some(sp::stream_output::Kind::Stdout(b)) => Output::Stdout(b.into()),
                Some(sp::stream_output::Kind::Stderr(b)) => Output::Stderr(b.into()),
                Some(sp::stream_output::Kind::Exit(s)) => Output::Exit(s.exit_code),
                Some(sp::stream_output::Kind::Error(e)) => Output::Failed(e),
                None => continue,
            };
            let end = matches!(msg, Output::Exit(_) | Output::Failed(_));
            if tx.send(msg).await.is_err() || end {
                return;
            }
        }
    });
    rx
}

async fn start(
    rt: &Arc<Runtime>,
    req: &Request,
    mut input: mpsc::Receiver<sp::StreamInput>,
) -> Result<tonic::Streaming<sp::StreamOutput>, String> {
    let (container_id, cmd, streams, attach) = match req {
        Request::Exec {
            container_id,
            cmd,
            streams,
        } => (container_id, cmd.clone(), *streams, false),
        Request::Attach {
            container_id,
            streams,
        } => (container_id, Vec::new(), *streams, true),
        Request::PortForward { .. } => return Err("not a remotecommand request".into()),
    };
    let c = rt.find_container(container_id).map_err(|e| e.to_string())?;
    let sb = rt.find_sandbox(&c.sandbox_id).map_err(|e| e.to_string())?;
    let mut client = rt.shim_of(&sb).map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel(64);
    let first = sp::StreamInput {
        kind: Some(sp::stream_input::Kind::Start(sp::StreamStart {
            container_id: c.id.clone(),
            cmd,
            tty: streams.tty,
            stdin: streams.stdin,
            stdout: streams.stdout,
            stderr: streams.stderr,
        })),
    };
    tx.send(first)
        .await
        .map_err(|_| "internal channel closed")?;
    tokio::spawn(async move {
        while let Some(i) = input.recv().await {
            if tx.send(i).await.is_err() {
                break;
            }
        }
    });
    let stream = ReceiverStream::new(rx);
    let resp = if attach {
        client.attach(stream).await
    } else {
        client.exec(stream).await
    };
    resp.map(|r| r.into_inner()).map_err(|e| {
        format!(
            "{} container {}: {}",
            if attach { "attaching to" } else { "exec in" },
            c.id,
            e.message()
        )
    })
}

/// The streams a client of `protocol` opens for `s`.
fn expected(protocol: &str, s: Streams) -> Vec<StreamType> {
    let mut v = vec![StreamType::Error];
    if s.stdin {
        v.push(StreamType::Stdin);
    }
    if s.stdout {
        v.push(StreamType::Stdout);
    }
    if s.stderr {
        v.push(StreamType::Stderr);
    }
    if s.tty && !matches!(protocol, channel::V1 | channel::V2) {
        v.push(StreamType::Resize);
    }
    v
}

/// Writes the final status on the error stream, as `protocol` wants it.
fn status_bytes(protocol: &str, status: &Status) -> Option<Vec<u8>> {
    match protocol {
        channel::V4 | channel::V5 => Some(status.to_json()),
        // v1-v3 carry a failure as text and success as nothing.
        _ if status.status == "Success" => None,
        _ => Some(status.message.clone().into_bytes()),
    }
}

fn input_of(kind: sp::stream_input::Kind) -> sp::StreamInput {
    sp::StreamInput { kind: Some(kind) }
}

/// Serves one remotecommand request over an upgraded SPDY session.
pub async fn serve_spdy(
    rt: Arc<Runtime>,
    req: Request,
    protocol: &'static str,
    session: Session,
    mut incoming: mpsc::Receiver<Stream>,
) {
    let want = expected(protocol, streams_of(&req));
    let mut got: HashMap<StreamType, Stream> = HashMap::new();
    let deadline = tokio::time::sleep(STREAM_CREATION_TIMEOUT);
    tokio::pin!(deadline);
    while !want.iter().all(|t| got.contains_key(t)) {
        tokio::select! {
            s = incoming.recv() => match s {
                Some(s) => match s.headers.get(channel::STREAM_TYPE).and_then(StreamType::parse) {
                    Some(t) if want.contains(&t) => { got.insert(t, s); }
                    _ => { s.writer().reset().await; }
                },
                None => return,
            },
            _ = &mut deadline => {
                info!(?want, got = ?got.keys().collect::<Vec<_>>(), "client did not open its streams in time");
                session.go_away().await;
                return;
            }
        }
    }
    let (in_tx, in_rx) = mpsc::channel(64);
    if let Some(mut stdin) = got.remove(&StreamType::Stdin) {
        let tx = in_tx.clone();
        tokio::spawn(async move {
            while let Some(b) = stdin.read().await {
                if tx
                    .send(input_of(sp::stream_input::Kind::Stdin(b.to_vec())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = tx
                .send(input_of(sp::stream_input::Kind::StdinClose(true)))
                .await;
        });
    }
    if let Some(mut resize) = got.remove(&StreamType::Resize) {
        let tx = in_tx.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Some(b) = resize.read().await {
                buf.extend_from_slice(&b);
                let Ok(sizes) = parse_sizes(&mut buf) else {
                    debug!("malformed terminal size: ignoring the resize stream");
                    return;
                };
                for s in sizes {
                    let r = sp::Resize {
                        width: s.width as u32,
                        height: s.height as u32,
                    };
                    if tx
                        .send(input_of(sp::stream_input::Kind::Resize(r)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
    }
    drop(in_tx);
    let stdout = got.get(&StreamType::Stdout).map(Stream::writer);
    let stderr = got.get(&StreamType::Stderr).map(Stream::writer);
    let error = got.get(&StreamType::Error).map(Stream::writer);
    let mut out = run_process(&rt, &req, in_rx).await;
    let mut status = Status::internal("the process output ended without a status");
    loop {
        let o = tokio::select! {
            o = out.recv() => match o {
                Some(o) => o,
                None => break,
            },
            // The client went away (an attach does not end with it otherwise).
            _ = session.closed() => return,
        };
        match o {
            Output::Stdout(b) => {
                if let Some(w) = &stdout {
                    let _ = w.write(&b).await;
                }
            }
            Output::Stderr(b) => {
                if let Some(w) = &stderr {
                    let _ = w.write(&b).await;
                }
            }
            Output::Exit(code) => {
                status = Status::exit(code);
                break;
            }
            Output::Failed(m) => {
                status = Status::internal(&m);
                break;
            }
        }
    }
    for w in [&stdout, &stderr].into_iter().flatten() {
        let _ = w.close().await;
    }
    if let Some(w) = &error {
        if let Some(b) = status_bytes(protocol, &status) {
            let _ = w.write(&b).await;
        }
        let _ = w.close().await;
    }
    session.go_away().await;
    // Keep the streams alive until the writer has flushed the GOAWAY.
    drop(got);
}
