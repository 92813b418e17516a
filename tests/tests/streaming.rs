//! Exec and port-forward over the streaming server, through the URL the CRI call returned,
//! spoken by the tests' own SPDY client: stdio and exit codes, subprotocol versions,
//! single-use and expiring tokens, and parallel streams.

use std::time::Duration;

use isola_proto::cri;
use isola_streaming::channel;
use isola_tests::fixtures::*;
use isola_tests::streaming_client::*;
use isola_tests::*;

async fn exec_url(rt: &mut Runtime, id: &str, cmd: &[&str], stdin: bool, tty: bool) -> String {
    rt.exec(cri::ExecRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout: true,
        stderr: !tty,
    })
    .await
    .expect("Exec")
    .into_inner()
    .url
}

const SCRIPT: &str = "read x; echo got $x; echo e >&2; exit 7";

async fn exec_script(url: &str, protocol: &str) -> Outcome {
    let (session, chosen) = spdy_connect(url, &[protocol])
        .await
        .expect("connect")
        .expect("upgrade");
    assert_eq!(chosen, protocol);
    let r = Remote::open(session, true, true, true, false)
        .await
        .expect("streams");
    r.write_stdin(b"hello\n").await.expect("stdin");
    r.close_stdin().await.expect("close stdin");
    r.finish().await.expect("finish")
}

async fn spdy_exec_carries_stdio_and_the_exit_code(handler: &str) {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("exec");
    let pod = run_pod(&mut rt, pc.clone(), handler).await.expect("pod");
    let id = run(&mut rt, &pod, &pc, w.sh("c", "sleep 3600")).await;

    for protocol in [channel::V4, channel::V5] {
        let url = exec_url(&mut rt, &id, &["sh", "-c", SCRIPT], true, false).await;
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        let o = exec_script(&url, protocol).await;
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            "got hello\n",
            "{protocol}"
        );
        assert_eq!(String::from_utf8_lossy(&o.stderr), "e\n", "{protocol}");
        assert_eq!(
            o.exit_code(),
            Some(7),
            "{protocol}: {:?}",
            String::from_utf8_lossy(&o.error)
        );

        // The token was single-use.
        let again = spdy_connect(&url, &[protocol]).await.expect("connect");
        let refused = again.err().expect("a used token is refused");
        assert_eq!(refused.status, 404, "{}", refused.body);
    }
    // v2 says a failure as text on the error stream.
    let url = exec_url(&mut rt, &id, &["sh", "-c", SCRIPT], true, false).await;
    let o = exec_script(&url, channel::V2).await;
    assert_eq!(String::from_utf8_lossy(&o.stdout), "got hello\n");
    assert!(
        String::from_utf8_lossy(&o.error).contains("exit status 7"),
        "{:?}",
        String::from_utf8_lossy(&o.error)
    );
    // A successful command ends with a Success status.
    let url = exec_url(&mut rt, &id, &["echo", "fine"], false, false).await;
    let (session, _) = spdy_connect(&url, &[channel::V4]).await.unwrap().unwrap();
    let o = Remote::open(session, false, true, true, false)
        .await
        .unwrap()
        .finish()
        .await
        .unwrap();
    assert_eq!(
        (o.stdout.as_slice(), o.exit_code()),
        (&b"fine\n"[..], Some(0))
    );

    // An unknown subprotocol is refused, naming what is supported.
    let url = exec_url(&mut rt, &id, &["true"], false, false).await;
    let refused = spdy_connect(&url, &["v9.channel.k8s.io"])
        .await
        .unwrap()
        .err()
        .expect("refused");
    assert_eq!(refused.status, 403);
    assert!(
        refused.body.contains("v4.channel.k8s.io"),
        "{}",
        refused.body
    );

    // Exec of a container that is not running is refused by the CRI call.
    let err = rt
        .exec(cri::ExecRequest {
            container_id: id.clone(),
            cmd: vec!["true".into()],
            stdout: true,
            tty: true,
            stderr: true,
            ..Default::default()
        })
        .await
        .expect_err("tty with stderr");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    teardown(&mut rt, &pod).await;
}

async fn many_parallel_execs_do_not_interfere(handler: &str) {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("par");
    let pod = run_pod(&mut rt, pc.clone(), handler).await.expect("pod");
    let id = run(&mut rt, &pod, &pc, w.sh("c", "sleep 3600")).await;
    let mut urls = Vec::new();
    for n in 0..8 {
        let script = format!("read x; echo $x-{n}; echo err-{n} >&2; exit {n}");
        urls.push(exec_url(&mut rt, &id, &["sh", "-c", &script], true, false).await);
    }
    let tasks: Vec<_> = urls
        .into_iter()
        .enumerate()
        .map(|(n, url)| {
            tokio::spawn(async move {
                let (s, _) = spdy_connect(&url, &[channel::V4]).await.unwrap().unwrap();
                let r = Remote::open(s, true, true, true, false).await.unwrap();
                r.write_stdin(format!("in{n}\n").as_bytes()).await.unwrap();
                r.close_stdin().await.unwrap();
                (n, r.finish().await.unwrap())
            })
        })
        .collect();
    for t in tasks {
        let (n, o) = t.await.expect("task");
        assert_eq!(String::from_utf8_lossy(&o.stdout), format!("in{n}-{n}\n"));
        assert_eq!(String::from_utf8_lossy(&o.stderr), format!("err-{n}\n"));
        assert_eq!(o.exit_code(), Some(n as i32));
    }
    teardown(&mut rt, &pod).await;
}

async fn forward_url(rt: &mut Runtime, pod: &str, ports: &[i32]) -> String {
    rt.port_forward(cri::PortForwardRequest {
        pod_sandbox_id: pod.into(),
        port: ports.to_vec(),
    })
    .await
    .expect("PortForward")
    .into_inner()
    .url
}

async fn spdy_port_forward_reaches_a_server_in_the_pod(handler: &str) {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("pf");
    let pod = run_pod(&mut rt, pc.clone(), handler).await.expect("pod");
    run(
        &mut rt,
        &pod,
        &pc,
        w.sh(
            "web",
            "mkdir -p /tmp/www && echo hello-from-pod > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
        ),
    )
    .await;
    let request = b"GET /index.html HTTP/1.0\r\n\r\n";
    let mut last = (Vec::new(), String::new());
    let mut ok = false;
    for attempt in 0..50 {
        let url = forward_url(&mut rt, &pod, &[8080]).await;
        let (session, chosen) = spdy_connect(&url, &[channel::PORT_FORWARD])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(chosen, channel::PORT_FORWARD);
        last = spdy_forward(&session, 8080, attempt, request)
            .await
            .expect("forward");
        if String::from_utf8_lossy(&last.0).contains("hello-from-pod") {
            ok = true;
            // A second connection on the same session works too.
            let again = spdy_forward(&session, 8080, attempt + 1000, request)
                .await
                .unwrap();
            assert!(String::from_utf8_lossy(&again.0).contains("hello-from-pod"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "no answer from httpd: {:?}", last);

    // A closed port says so on the error stream.
    let url = forward_url(&mut rt, &pod, &[]).await;
    let (session, _) = spdy_connect(&url, &[channel::PORT_FORWARD])
        .await
        .unwrap()
        .unwrap();
    let (data, err) = spdy_forward(&session, 9, 1, b"x").await.unwrap();
    assert!(data.is_empty());
    assert!(err.contains("port 9"), "{err}");
    // A port the request did not name is refused.
    let url = forward_url(&mut rt, &pod, &[8080]).await;
    let (session, _) = spdy_connect(&url, &[channel::PORT_FORWARD])
        .await
        .unwrap()
        .unwrap();
    let (_, err) = spdy_forward(&session, 8081, 1, b"x").await.unwrap();
    assert!(err.contains("8081"), "{err}");
    teardown(&mut rt, &pod).await;
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let agent = Agent::start_with(AgentOptions {
        config: "[streaming]\naddress = \"127.0.0.1:0\"\ntoken_ttl_seconds = 1\n".into(),
    })
    .await;
    let mut rt = agent.runtime().await;
    let pod = run_pod(&mut rt, pod_config("ttl"), "").await.expect("pod");
    let url = forward_url(&mut rt, &pod, &[80]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let refused = spdy_connect(&url, &[channel::PORT_FORWARD])
        .await
        .unwrap()
        .err()
        .expect("an expired token is refused");
    assert_eq!(refused.status, 404, "{}", refused.body);
    assert!(refused.body.contains("expired"), "{}", refused.body);
    // Malformed SPDY after the upgrade ends that connection, not the agent.
    for garbage in [
        &[
            0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x0c, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 9, 9,
        ][..],
        &[0x80, 0x07, 0x00, 0x01, 0xff, 0xff, 0xff, 0xff][..],
        &[0xff; 64][..],
    ] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let url = forward_url(&mut rt, &pod, &[80]).await;
        let (mut tcp, _) = spdy_upgrade(&url, &[channel::PORT_FORWARD])
            .await
            .unwrap()
            .unwrap();
        tcp.write_all(garbage).await.unwrap();
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the server kept a broken session open");
    }
    assert!(rt.version(cri::VersionRequest::default()).await.is_ok());
    // A token never issued, the same.
    let bogus = format!("{}/portforward/nope", url.rsplitn(3, '/').nth(2).unwrap());
    let refused = spdy_connect(&bogus, &[channel::PORT_FORWARD])
        .await
        .unwrap()
        .err()
        .unwrap();
    assert_eq!(refused.status, 404);
    teardown(&mut rt, &pod).await;
}

async fn websocket_exec_and_port_forward(handler: &str) {
    use futures::SinkExt;
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("ws");
    let pod = run_pod(&mut rt, pc.clone(), handler).await.expect("pod");
    let id = run(
        &mut rt,
        &pod,
        &pc,
        w.sh(
            "web",
            "mkdir -p /tmp/www && echo hello-ws > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
        ),
    )
    .await;

    // v5: stdin is closed with the close signal [255, 0].
    let url = exec_url(&mut rt, &id, &["sh", "-c", SCRIPT], true, false).await;
    let (mut ws, chosen) = ws_connect(&url, &[channel::V5, channel::V4])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(chosen, channel::V5);
    ws.send(ws_message(channel::CH_STDIN, b"there\n"))
        .await
        .unwrap();
    ws.send(ws_message(channel::CH_CLOSE, &[channel::CH_STDIN]))
        .await
        .unwrap();
    let got = ws_collect(&mut ws).await.unwrap();
    assert_eq!(got.get(&1).map(Vec::as_slice), Some(&b"got there\n"[..]));
    assert_eq!(got.get(&2).map(Vec::as_slice), Some(&b"e\n"[..]));
    let status: isola_streaming::channel::Status =
        serde_json::from_slice(got.get(&3).expect("status")).unwrap();
    assert_eq!(status.exit_code(), Some(7));
    // The token was single-use.
    let refused = ws_connect(&url, &[channel::V5])
        .await
        .unwrap()
        .err()
        .unwrap();
    assert_eq!(refused.status, 404);

    // Port-forward: channel 0 data, 1 error; each starts with the port (little endian).
    let mut answer = Vec::new();
    for _ in 0..50 {
        let url = forward_url(&mut rt, &pod, &[8080]).await;
        let (mut ws, _) = ws_connect(&format!("{url}?port=8080"), &[channel::V4])
            .await
            .unwrap()
            .unwrap();
        ws.send(ws_message(0, b"GET /index.html HTTP/1.0\r\n\r\n"))
            .await
            .unwrap();
        let got = ws_collect(&mut ws).await.unwrap();
        answer = got.get(&0).cloned().unwrap_or_default();
        if String::from_utf8_lossy(&answer).contains("hello-ws") {
            assert_eq!(&answer[..2], &8080u16.to_le_bytes());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        String::from_utf8_lossy(&answer).contains("hello-ws"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    teardown(&mut rt, &pod).await;
}

async fn read_until(s: &mut isola_streaming::spdy::Stream, seen: &mut Vec<u8>, want: &str) -> bool {
    let f = async {
        while !String::from_utf8_lossy(seen).contains(want) {
            match s.read().await {
                Some(b) => seen.extend_from_slice(&b),
                None => return false,
            }
        }
        true
    };
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or(false)
}

async fn tty_exec_follows_resizes(handler: &str) {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("tty");
    let pod = run_pod(&mut rt, pc.clone(), handler).await.expect("pod");
    let id = run(&mut rt, &pod, &pc, w.sh("c", "sleep 3600")).await;
    let url = exec_url(&mut rt, &id, &["sh"], true, true).await;
    let (session, _) = spdy_connect(&url, &[channel::V4]).await.unwrap().unwrap();
    let mut r = Remote::open(session, true, true, false, true)
        .await
        .expect("streams");
    let mut stdout = r.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    for (w_, h) in [(100u16, 30u16), (120, 40)] {
        r.resize(w_, h).await.unwrap();
        // The resize and the command travel on different streams: ask until it shows.
        let want = format!("{h} {w_}");
        let mut ok = false;
        for _ in 0..20 {
            r.write_stdin(b"stty size\n").await.unwrap();
            if tokio::time::timeout(
                Duration::from_millis(500),
                read_until(&mut stdout, &mut seen, &want),
            )
            .await
            .unwrap_or(false)
            {
                ok = true;
                break;
            }
        }
        assert!(ok, "no {want:?} in {:?}", String::from_utf8_lossy(&seen));
    }
    r.write_stdin(b"exit 3\n").await.unwrap();
    r.stdout = Some(stdout);
    let o = r.finish().await.unwrap();
    assert_eq!(
        o.exit_code(),
        Some(3),
        "{:?}",
        String::from_utf8_lossy(&o.error)
    );
    teardown(&mut rt, &pod).await;
}

fn with_stdin(mut c: cri::ContainerConfig, tty: bool) -> cri::ContainerConfig {
    c.stdin = true;
    c.tty = tty;
    c
}

async fn attach_url(rt: &mut Runtime, id: &str, tty: bool) -> String {
    rt.attach(cri::AttachRequest {
        container_id: id.into(),
        stdin: true,
        tty,
        stdout: true,
        stderr: !tty,
    })
    .await
    .expect("Attach")
    .into_inner()
    .url
}

async fn attach_joins_the_containers_stdio(handler: &str) {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("attach");
    let pod = run_pod(&mut rt, pc.clone(), handler).await.expect("pod");
    // A plain container echoing its stdin, and a TTY one running a shell.
    let plain = run(
        &mut rt,
        &pod,
        &pc,
        with_stdin(w.sh("plain", "while read l; do echo echo:$l; done"), false),
    )
    .await;
    let tty = run(&mut rt, &pod, &pc, with_stdin(w.sh("tty", "exec sh"), true)).await;

    // Over SPDY.
    let url = attach_url(&mut rt, &plain, false).await;
    let (session, _) = spdy_connect(&url, &[channel::V4]).await.unwrap().unwrap();
    let mut r = Remote::open(session, true, true, true, false)
        .await
        .unwrap();
    let mut out = r.stdout.take().unwrap();
    let mut seen = Vec::new();
    r.write_stdin(b"one\n").await.unwrap();
    assert!(
        read_until(&mut out, &mut seen, "echo:one").await,
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
    drop((r, out));

    // Over WebSocket, a second client of the same container.
    {
        use futures::{SinkExt, StreamExt};
        let url = attach_url(&mut rt, &plain, false).await;
        let (mut ws, _) = ws_connect(&url, &[channel::V5]).await.unwrap().unwrap();
        ws.send(ws_message(channel::CH_STDIN, b"two\n"))
            .await
            .unwrap();
        let mut got = Vec::new();
        let f = async {
            while let Some(Ok(m)) = ws.next().await {
                if let tokio_tungstenite::tungstenite::Message::Binary(b) = m {
                    if b.first() == Some(&channel::CH_STDOUT) {
                        got.extend_from_slice(&b[1..]);
                        if String::from_utf8_lossy(&got).contains("echo:two") {
                            return true;
                        }
                    }
                }
            }
            false
        };
        assert!(
            tokio::time::timeout(Duration::from_secs(20), f)
                .await
                .unwrap_or(false),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }

    // The TTY container: its shell answers on the terminal.
    let url = attach_url(&mut rt, &tty, true).await;
    let (session, _) = spdy_connect(&url, &[channel::V4]).await.unwrap().unwrap();
    let mut r = Remote::open(session, true, true, false, true)
        .await
        .unwrap();
    let mut out = r.stdout.take().unwrap();
    let mut seen = Vec::new();
    r.resize(77, 22).await.unwrap();
    let mut ok = false;
    for _ in 0..20 {
        r.write_stdin(b"stty size\n").await.unwrap();
        if tokio::time::timeout(
            Duration::from_millis(500),
            read_until(&mut out, &mut seen, "22 77"),
        )
        .await
        .unwrap_or(false)
        {
            ok = true;
            break;
        }
    }
    assert!(ok, "{:?}", String::from_utf8_lossy(&seen));
    // Ending the shell ends the attach with the container's exit code.
    r.write_stdin(b"exit 4\n").await.unwrap();
    r.stdout = Some(out);
    let o = r.finish().await.unwrap();
    assert_eq!(
        o.exit_code(),
        Some(4),
        "{:?}",
        String::from_utf8_lossy(&o.error)
    );
    teardown(&mut rt, &pod).await;
}

isola_tests::for_each_handler!(
    spdy_exec_carries_stdio_and_the_exit_code,
    many_parallel_execs_do_not_interfere,
    spdy_port_forward_reaches_a_server_in_the_pod,
    websocket_exec_and_port_forward,
    tty_exec_follows_resizes,
    attach_joins_the_containers_stdio,
);
