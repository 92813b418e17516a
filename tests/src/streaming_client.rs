//! A client of the agent's streaming server, as kubectl/crictl speak to kubelet's: an
//! HTTP/1.1 upgrade to SPDY/3.1, then the remotecommand or port-forward streams (the
//! SPDY framing comes from `isola-streaming`, the protocol logic is written here anew).

use std::time::Duration;

use anyhow::{bail, Context};
use isola_streaming::channel::{self, Status, TerminalSize};
use isola_streaming::spdy::{Headers, Session, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP answer that was not an upgrade.
#[derive(Debug)]
pub struct Refused {
    /// The status code.
    pub status: u16,
    /// The body (the server's reason).
    pub body: String,
}

/// Connects to `url` and upgrades to SPDY/3.1 offering `protocols`; returns the session
/// and the chosen protocol, or the refusal.
pub async fn spdy_connect(
    url: &str,
    protocols: &[&str],
) -> anyhow::Result<Result<(Session, String), Refused>> {
    Ok(match spdy_upgrade(url, protocols).await? {
        Ok((tcp, chosen)) => Ok((Session::start(tcp, false).0, chosen)),
        Err(r) => Err(r),
    })
}

/// The HTTP upgrade alone: the connection, ready for SPDY frames, and the chosen
/// protocol (or the refusal).
pub async fn spdy_upgrade(
    url: &str,
    protocols: &[&str],
) -> anyhow::Result<Result<(TcpStream, String), Refused>> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http URL: {url}"))?;
    let (host, path) = rest.split_once('/').context("URL without a path")?;
    let mut tcp = TcpStream::connect(host).await?;
    let mut req = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nContent-Length: 0\r\n"
    );
    for p in protocols {
        req.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await?;
    // Read the head a byte at a time: what follows it belongs to the SPDY session.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = tcp.read_u8().await.context("reading the HTTP answer")?;
        head.push(b);
        if head.len() > 64 * 1024 {
            bail!("HTTP answer head too long");
        }
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status code")?;
    let header = |name: &str| {
        text.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    if status != 101 {
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len.min(64 * 1024)];
        let _ = tcp.read_exact(&mut body).await;
        return Ok(Err(Refused {
            status,
            body: String::from_utf8_lossy(&body).to_string(),
        }));
    }
    let chosen = header(channel::PROTOCOL_HEADER).unwrap_or_default();
    Ok(Ok((tcp, chosen)))
}

/// What an exec or attach returned.
#[derive(Debug, Default)]
pub struct Outcome {
    /// stdout bytes.
    pub stdout: Vec<u8>,
    /// stderr bytes.
    pub stderr: Vec<u8>,
    /// The error stream's bytes.
    pub error: Vec<u8>,
}

impl Outcome {
    /// The exit code from a v4+ status.
    pub fn exit_code(&self) -> Option<i32> {
        serde_json::from_slice::<Status>(&self.error)
            .ok()?
            .exit_code()
    }
}

async fn drain(s: Option<Stream>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(mut s) = s {
        while let Some(b) = s.read().await {
            out.extend_from_slice(&b);
        }
    }
    out
}

async fn open(session: &Session, kind: &str) -> anyhow::Result<Stream> {
    Ok(session
        .open(Headers::new().with(channel::STREAM_TYPE, kind))
        .await?)
}

/// A remotecommand session in progress.
pub struct Remote {
    /// The session.
    pub session: Session,
    /// stdin, when asked for.
    pub stdin: Option<Stream>,
    /// stdout.
    pub stdout: Option<Stream>,
    /// stderr.
    pub stderr: Option<Stream>,
    /// The resize stream (tty only).
    pub resize: Option<Stream>,
    /// The error stream.
    pub error: Stream,
}

impl Remote {
    /// Opens the streams a client of these options opens (error first, as kubectl).
    pub async fn open(
        session: Session,
        stdin: bool,
        stdout: bool,
        stderr: bool,
        tty: bool,
    ) -> anyhow::Result<Remote> {
        let error = open(&session, "error").await?;
        let mut r = Remote {
            stdin: None,
            stdout: None,
            stderr: None,
            resize: None,
            error,
            session,
        };
        if stdin {
            r.stdin = Some(open(&r.session, "stdin").await?);
        }
        if stdout {
            r.stdout = Some(open(&r.session, "stdout").await?);
        }
        if stderr {
            r.stderr = Some(open(&r.session, "stderr").await?);
        }
        if tty {
            r.resize = Some(open(&r.session, "resize").await?);
        }
        Ok(r)
    }

    /// Writes to stdin.
    pub async fn write_stdin(&self, data: &[u8]) -> anyhow::Result<()> {
        if let Some(s) = &self.stdin {
            s.writer().write(data).await?;
        }
        Ok(())
    }

    /// Closes stdin.
    pub async fn close_stdin(&self) -> anyhow::Result<()> {
        if let Some(s) = &self.stdin {
            s.writer().close().await?;
        }
        Ok(())
    }

    /// Sends a terminal size.
    pub async fn resize(&self, width: u16, height: u16) -> anyhow::Result<()> {
        if let Some(s) = &self.resize {
            let j = serde_json::to_vec(&TerminalSize { width, height })?;
            s.writer().write(&j).await?;
        }
        Ok(())
    }

    /// Reads stdout and stderr to their ends and the error stream; times out after 60 s.
    pub async fn finish(self) -> anyhow::Result<Outcome> {
        let Remote {
            stdout,
            stderr,
            error,
            stdin,
            resize,
            session,
        } = self;
        let f = async move {
            let (stdout, stderr, error) =
                tokio::join!(drain(stdout), drain(stderr), drain(Some(error)));
            drop((stdin, resize, session));
            Outcome {
                stdout,
                stderr,
                error,
            }
        };
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .context("the remote command did not end within 60s")
    }
}

/// One port-forward connection over SPDY: sends `data`, half-closes, and returns what
/// came back and the error stream's text.
pub async fn spdy_forward(
    session: &Session,
    port: u16,
    request_id: u32,
    data: &[u8],
) -> anyhow::Result<(Vec<u8>, String)> {
    let h = |kind: &str| {
        Headers::new()
            .with(channel::STREAM_TYPE, kind)
            .with(channel::PORT, &port.to_string())
            .with(channel::REQUEST_ID, &request_id.to_string())
    };
    let error = session.open(h("error")).await?;
    let mut s = session.open(h("data")).await?;
    s.writer().write(data).await?;
    s.writer().close().await?;
    let f = async {
        let mut back = Vec::new();
        while let Some(b) = s.read().await {
            back.extend_from_slice(&b);
        }
        let e = drain(Some(error)).await;
        (back, String::from_utf8_lossy(&e).to_string())
    };
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .context("port-forward did not end within 60s")
}

/// A WebSocket connection carrying channel messages.
pub type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Connects to `url` (http:// as the CRI returns it) over WebSocket offering `protocols`;
/// returns the socket and the chosen protocol, or the refusal.
pub async fn ws_connect(
    url: &str,
    protocols: &[&str],
) -> anyhow::Result<Result<(Ws, String), Refused>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http URL: {url}"))?;
    let host = rest.split('/').next().unwrap_or_default();
    let mut req = format!("ws://{rest}").into_client_request()?;
    if !protocols.is_empty() {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", protocols.join(", ").parse()?);
    }
    let tcp = TcpStream::connect(host).await?;
    match tokio_tungstenite::client_async(req, tcp).await {
        Ok((ws, resp)) => {
            let chosen = resp
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            Ok(Ok((ws, chosen)))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Ok(Err(Refused {
            status: resp.status().as_u16(),
            body: String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string(),
        })),
        Err(e) => Err(e.into()),
    }
}

/// A binary channel message.
pub fn ws_message(ch: u8, data: &[u8]) -> tokio_tungstenite::tungstenite::Message {
    let mut v = vec![ch];
    v.extend_from_slice(data);
    tokio_tungstenite::tungstenite::Message::Binary(v.into())
}

/// Reads channel messages until the server closes; returns the bytes of each channel.
pub async fn ws_collect(ws: &mut Ws) -> anyhow::Result<std::collections::BTreeMap<u8, Vec<u8>>> {
    use futures::StreamExt;
    let mut out: std::collections::BTreeMap<u8, Vec<u8>> = Default::default();
    let f = async {
        while let Some(m) = ws.next().await {
            match m? {
                tokio_tungstenite::tungstenite::Message::Binary(b) => {
                    if let Some((ch, rest)) = b.split_first() {
                        out.entry(*ch).or_default().extend_from_slice(rest);
                    }
                }
                tokio_tungstenite::tungstenite::Message::Close(_) => break,
                _ => {}
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .context("the WebSocket did not end within 60s")??;
    Ok(out)
}
