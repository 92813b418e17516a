//! The HTTP/1.1 side: `/exec/<token>`, `/attach/<token>`, `/portforward/<token>`,
//! each upgraded to SPDY/3.1 or WebSocket with a Kubernetes subprotocol.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, UPGRADE};
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use isola_streaming::channel;
use isola_streaming::spdy::{Session, UPGRADE_TOKEN};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, info_span, Instrument};

use super::{portforward, remotecommand, websocket, Request, StreamingError};
use crate::runtime::Runtime;

type Resp = Response<Full<Bytes>>;

/// Binds the configured address (port 0 picks a free port) and records it.
pub async fn bind(rt: &Runtime) -> Result<TcpListener, StreamingError> {
    let address = rt.config.streaming.address.clone();
    let l = TcpListener::bind(&address)
        .await
        .map_err(|source| StreamingError::Bind {
            address: address.clone(),
            source,
        })?;
    let local = l
        .local_addr()
        .map_err(|source| StreamingError::Bind { address, source })?;
    rt.streaming.set_listening(local);
    info!(address = %local, "streaming server listening");
    Ok(l)
}

/// Serves connections until `shutdown` turns true.
pub async fn serve(listener: TcpListener, rt: Arc<Runtime>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "accepting a streaming connection");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let rt = rt.clone();
        tokio::spawn(
            async move {
                let svc = hyper::service::service_fn(move |req| {
                    let rt = rt.clone();
                    async move { Ok::<_, Infallible>(handle(rt, req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await
                {
                    debug!(error = %e, "streaming connection");
                }
            }
            .instrument(info_span!("streaming", %peer)),
        );
    }
}

fn plain(code: StatusCode, msg: impl Into<String>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(msg.into() + "\n")));
    *r.status_mut() = code;
    r
}

async fn handle(rt: Arc<Runtime>, req: hyper::Request<Incoming>) -> Resp {
    let path = req.uri().path().trim_start_matches('/').to_owned();
    let Some((kind, token)) = path.split_once('/') else {
        return plain(
            StatusCode::NOT_FOUND,
            "expected /exec/, /attach/ or /portforward/<token>",
        );
    };
    let Some(parked) = rt.streaming.take(token) else {
        return plain(
            StatusCode::NOT_FOUND,
            "unknown token: it was used already, has expired, or never existed",
        );
    };
    if parked.path() != kind {
        return plain(
            StatusCode::BAD_REQUEST,
            format!("the token is not for /{kind}/"),
        );
    }
    let upgrade = header(&req, UPGRADE.as_str()).join(",");
    if upgrade
        .split(',')
        .any(|u| u.trim().eq_ignore_ascii_case("websocket"))
    {
        return websocket_upgrade(rt, parked, req);
    }
    if !upgrade
        .split(',')
        .any(|u| u.trim().eq_ignore_ascii_case(UPGRADE_TOKEN))
    {
        return plain(
            StatusCode::BAD_REQUEST,
            format!("expected an upgrade to {UPGRADE_TOKEN}, got {upgrade:?}"),
        );
    }
    let offered = header(&req, channel::PROTOCOL_HEADER);
    let offered: Vec<&str> = offered.iter().map(String::as_str).collect();
    let supported: &[&'static str] = match parked {
        Request::PortForward { .. } => &[channel::PORT_FORWARD],
        _ => &channel::SPDY_REMOTECOMMAND,
    };
    let Some(protocol) = channel::negotiate(&offered, supported) else {
        return plain(
            StatusCode::FORBIDDEN,
            format!("no common subprotocol: offered {offered:?}, supported {supported:?}"),
        );
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(
        async move {
            let io = match on_upgrade.await {
                Ok(u) => TokioIo::new(u),
                Err(e) => {
                    debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            let (session, incoming) = Session::start(io, true);
            match parked {
                Request::PortForward { sandbox_id, ports } => {
                    portforward::serve_spdy(rt, sandbox_id, ports, session, incoming).await
                }
                req => remotecommand::serve_spdy(rt, req, protocol, session, incoming).await,
            }
        }
        .instrument(info_span!("spdy", protocol)),
    );
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static(UPGRADE_TOKEN));
    h.insert(channel::PROTOCOL_HEADER, HeaderValue::from_static(protocol));
    r
}

/// Answers a WebSocket handshake (RFC 6455) and serves the connection once upgraded.
fn websocket_upgrade(rt: Arc<Runtime>, parked: Request, req: hyper::Request<Incoming>) -> Resp {
    let Some(key) = header(&req, "sec-websocket-key").into_iter().next() else {
        return plain(
            StatusCode::BAD_REQUEST,
            "WebSocket upgrade without Sec-WebSocket-Key",
        );
    };
    let offered = header(&req, "sec-websocket-protocol");
    let offered: Vec<&str> = offered.iter().map(String::as_str).collect();
    let supported: &[&'static str] = match parked {
        Request::PortForward { .. } => &channel::WS_PORT_FORWARD,
        _ => &channel::WS_REMOTECOMMAND,
    };
    let protocol = if offered.is_empty() && supported.contains(&"") {
        Some("")
    } else {
        channel::negotiate(&offered, supported)
    };
    let Some(protocol) = protocol else {
        return plain(
            StatusCode::FORBIDDEN,
            format!("no common subprotocol: offered {offered:?}, supported {supported:?}"),
        );
    };
    // Port-forward over WebSocket names its ports in the query: ?port=80&port=8080.
    let query_ports: Result<Vec<u16>, _> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.strip_prefix("port="))
        .map(str::parse::<u16>)
        .collect();
    let parked = match parked {
        Request::PortForward { sandbox_id, ports } => {
            let Ok(wanted) = query_ports else {
                return plain(StatusCode::BAD_REQUEST, "a port= query value is not a port");
            };
            if wanted.is_empty() || wanted.contains(&0) {
                return plain(StatusCode::BAD_REQUEST, "name the ports: ?port=N&port=M");
            }
            if let Some(p) = wanted
                .iter()
                .find(|p| !ports.is_empty() && !ports.contains(p))
            {
                return plain(
                    StatusCode::BAD_REQUEST,
                    format!("port {p} was not asked for in the PortForward request"),
                );
            }
            Request::PortForward {
                sandbox_id,
                ports: wanted,
            }
        }
        other => other,
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(
        async move {
            let io = match on_upgrade.await {
                Ok(u) => TokioIo::new(u),
                Err(e) => {
                    debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            match parked {
                Request::PortForward { sandbox_id, ports } => {
                    websocket::serve_port_forward(rt, sandbox_id, ports, protocol, io).await
                }
                req => websocket::serve_remotecommand(rt, req, protocol, io).await,
            }
        }
        .instrument(info_span!("websocket", protocol)),
    );
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    if !protocol.is_empty() {
        h.insert("sec-websocket-protocol", HeaderValue::from_static(protocol));
    }
    r
}

fn header(req: &hyper::Request<Incoming>, name: &str) -> Vec<String> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect()
}
