//! Port-forward: byte streams to TCP ports inside a pod's network namespace, over SPDY
//! (`portforward.k8s.io`: a data and an error stream per connection, paired by the
//! `requestID` header) through the shim's PortForward call.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use isola_proto::shim as sp;
use isola_streaming::channel;
use isola_streaming::spdy::{Session, Stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

use crate::runtime::Runtime;

/// Copies between a client's byte stream and `port` in the pod of `sandbox_id`. Ends
/// when the pod side closes (after `to_client` got everything); an error message is for
/// the client's error stream.
pub async fn forward(
    rt: &Arc<Runtime>,
    sandbox_id: &str,
    port: u16,
    mut from_client: mpsc::Receiver<Bytes>,
    to_client: mpsc::Sender<Bytes>,
) -> Result<(), String> {
    let fail = |e: String| format!("error forwarding port {port} to pod {sandbox_id}: {e}");
    let sb = rt
        .find_sandbox(sandbox_id)
        .map_err(|e| fail(e.to_string()))?;
    let mut client = rt.shim_of(&sb).map_err(|e| fail(e.to_string()))?;
    let (tx, rx) = mpsc::channel(64);
    let start = sp::PortForwardInput {
        kind: Some(sp::port_forward_input::Kind::Start(sp::PortForwardStart {
            port: port as u32,
        })),
    };
    tx.send(start)
        .await
        .map_err(|_| fail("internal channel closed".into()))?;
    tokio::spawn(async move {
        while let Some(b) = from_client.recv().await {
            let m = sp::PortForwardInput {
                kind: Some(sp::port_forward_input::Kind::Data(b.to_vec())),
            };
            if tx.send(m).await.is_err() {
                return;
            }
        }
        let _ = tx
            .send(sp::PortForwardInput {
                kind: Some(sp::port_forward_input::Kind::CloseWrite(true)),
            })
            .await;
        // Keep the request stream open until the shim ends the call.
        tx.closed().await;
    });
    let mut out = client
        .port_forward(ReceiverStream::new(rx))
        .await
        .map_err(|e| fail(e.message().to_owned()))?
        .into_inner();
    loop {
        match out.message().await {
            Ok(Some(sp::PortForwardOutput {
                kind: Some(sp::port_forward_output::Kind::Data(b)),
            })) => {
                if to_client.send(b.into()).await.is_err() {
                    return Ok(());
                }
            }
            Ok(Some(sp::PortForwardOutput {
                kind: Some(sp::port_forward_output::Kind::Error(e)),
            })) => return Err(fail(e)),
            Ok(Some(_)) => {}
            Ok(None) => return Ok(()),
            Err(e) => return Err(fail(e.message().to_owned())),
        }
    }
}

/// Serves port-forward streams over an upgraded SPDY session until it ends.
pub async fn serve_spdy(
    rt: Arc<Runtime>,
    sandbox_id: String,
    ports: Vec<u16>,
    _session: Session,
    mut incoming: mpsc::Receiver<Stream>,
) {
    // requestID -> (error stream, data stream) until both came.
    let mut pending: HashMap<String, (Option<Stream>, Option<Stream>)> = HashMap::new();
    while let Some(s) = incoming.recv().await {
        let kind = s.headers.get(channel::STREAM_TYPE).unwrap_or("").to_owned();
        let id = s.headers.get(channel::REQUEST_ID).unwrap_or("").to_owned();
        let entry = pending.entry(id.clone()).or_default();
        match kind.as_str() {
            "error" => entry.0 = Some(s),
            "data" => entry.1 = Some(s),
            _ => {
                s.writer().reset().await;
                continue;
            }
        }
        if let (Some(_), Some(_)) = entry {
            let Some((Some(err), Some(data))) = pending.remove(&id) else {
                continue;
            };
            tokio::spawn(pair(
                rt.clone(),
                sandbox_id.clone(),
                ports.clone(),
                err,
                data,
            ));
        }
    }
}

async fn pair(
    rt: Arc<Runtime>,
    sandbox_id: String,
    ports: Vec<u16>,
    err: Stream,
    mut data: Stream,
) {
    let ew = err.writer();
    let dw = data.writer();
    let port = match data.headers.get(channel::PORT).map(str::parse::<u16>) {
        Some(Ok(p)) if p > 0 && (ports.is_empty() || ports.contains(&p)) => p,
        other => {
            let msg = match other {
                Some(Ok(p)) => format!("port {p} was not asked for in the PortForward request"),
                _ => "the data stream has no valid port header".to_owned(),
            };
            let _ = ew.write(msg.as_bytes()).await;
            let _ = ew.close().await;
            let _ = dw.close().await;
            return;
        }
    };
    let (in_tx, in_rx) = mpsc::channel(64);
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        while let Some(b) = data.read().await {
            if in_tx.send(b).await.is_err() {
                return;
            }
        }
    });
    let dw2 = dw.clone();
    let copy_out = tokio::spawn(async move {
        while let Some(b) = out_rx.recv().await {
            if dw2.write(&b).await.is_err() {
                return;
            }
        }
    });
    let r = forward(&rt, &sandbox_id, port, in_rx, out_tx).await;
    let _ = copy_out.await;
    if let Err(m) = r {
        debug!(port, error = %m, "port-forward");
        let _ = ew.write(m.as_bytes()).await;
    }
    let _ = dw.close().await;
    let _ = ew.close().await;
    drop(err);
}
