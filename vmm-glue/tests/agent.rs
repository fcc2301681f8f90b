//! The guest runtime on the host: the real `Agent` serving the real host-side `AgentConn` over
//! a unix socket pair (what QEMU's virtio-serial chardev is on the host). No VM needed; the
//! QEMU end-to-end test is tests/tests/sprites.rs.

#![allow(clippy::unwrap_used)]

use base64::Engine as _;
use std::time::Duration;
use vmm_glue::agent::Agent;
use vmm_glue::agent_client::{AgentConn, AgentError};
use vmm_glue::proto::{Event, ExecSpec, Op, Stream};

const T: Duration = Duration::from_secs(10);

fn start() -> AgentConn {
    let (host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
    let w = guest.try_clone().unwrap();
    let agent = Agent::new(Box::new(w), "/");
    std::thread::spawn(move || agent.serve(guest, false));
    host.set_nonblocking(true).unwrap();
    AgentConn::from_stream(tokio::net::UnixStream::from_std(host).unwrap())
}

fn sh(line: &str) -> ExecSpec {
    ExecSpec {
        args: vec!["sh".into(), "-c".into(), line.into()],
        ..Default::default()
    }
}

/// Runs a command to its end: (stdout, stderr, exit code).
async fn run(
    a: &AgentConn,
    spec: ExecSpec,
    stdin: Option<&[u8]>,
) -> (Vec<u8>, Vec<u8>, Option<i32>) {
    let mut ev = a.open(Op::Exec(spec)).unwrap();
    let session = match tokio::time::timeout(T, ev.next()).await.unwrap() {
        Some(Event::Started { session, .. }) => session,
        other => panic!("expected started, got {other:?}"),
    };
    if let Some(d) = stdin {
        a.notify(Op::Stdin {
            session: session.clone(),
            data: d.to_vec(),
        })
        .unwrap();
    }
    a.notify(Op::CloseStdin { session }).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match tokio::time::timeout(T, ev.next()).await.unwrap() {
            Some(Event::Output {
                stream: Stream::Stdout,
                data,
            }) => out.extend(data),
            Some(Event::Output {
                stream: Stream::Stderr,
                data,
            }) => err.extend(data),
            Some(Event::Exit { code, .. }) => return (out, err, code),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn exec_streams_output_stdin_and_exit_status() {
    let a = start();
    let v = a.call(Op::Ping, T).await.unwrap();
    assert_eq!(v["version"], vmm_glue::proto::VERSION);
    let (out, err, code) = run(&a, sh("echo out; echo err >&2; exit 7"), None).await;
    assert_eq!(
        (out.as_slice(), err.as_slice(), code),
        (&b"out\n"[..], &b"err\n"[..], Some(7))
    );
    let (out, _, code) = run(&a, sh("wc -c"), Some(&[b'x'; 100_000])).await;
    assert_eq!(
        (String::from_utf8_lossy(&out).trim(), code),
        ("100000", Some(0))
    );
    // env and cwd
    let mut spec = sh("echo $FOO; pwd");
    spec.env.insert("FOO".into(), "bar".into());
    spec.cwd = Some("/tmp".into());
    let (out, _, _) = run(&a, spec, None).await;
    assert_eq!(out, b"bar\n/tmp\n");
    // A terminal.
    let mut spec = sh("test -t 0 && echo tty; stty size");
    spec.tty = true;
    spec.rows = Some(33);
    spec.cols = Some(101);
    let (out, _, code) = run(&a, spec, None).await;
    assert_eq!(code, Some(0));
    let s = String::from_utf8_lossy(&out);
    assert!(s.contains("tty") && s.contains("33 101"), "{s:?}");
    // A background child holding the pipes does not delay the exit.
    let t0 = std::time::Instant::now();
    let (_, _, code) = run(&a, sh("sleep 30 & echo started"), None).await;
    assert_eq!(code, Some(0));
    assert!(t0.elapsed() < Duration::from_secs(20));
    // Errors: unknown program, empty command.
    let mut ev = a
        .open(Op::Exec(ExecSpec {
            args: vec!["/no/such/prog".into()],
            ..Default::default()
        }))
        .unwrap();
    assert!(
        matches!(ev.next().await, Some(Event::Error { message, .. }) if message.contains("/no/such/prog"))
    );
    let e = a.call(Op::Exec(ExecSpec::default()), T).await.unwrap_err();
    assert!(matches!(e, AgentError::Guest(m) if m.contains("empty")));
}

#[tokio::test]
async fn detachable_sessions_survive_detach_and_keep_scrollback() {
    let a = start();
    let mut spec = sh("echo one; read x; echo got $x; sleep 30");
    spec.detachable = true;
    let mut ev = a.open(Op::Exec(spec)).unwrap();
    let session = match ev.next().await {
        Some(Event::Started { session, .. }) => session,
        other => panic!("{other:?}"),
    };
    assert!(matches!(ev.next().await, Some(Event::Output { data, .. }) if data == b"one\n"));
    a.call(
        Op::Detach {
            session: session.clone(),
        },
        T,
    )
    .await
    .unwrap();
    drop(ev);
    a.notify(Op::Stdin {
        session: session.clone(),
        data: b"two\n".to_vec(),
    })
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let list = a.call(Op::Sessions, T).await.unwrap();
    let s = &list.as_array().unwrap()[0];
    assert_eq!(
        (
            s["id"].as_str(),
            s["attached"].as_bool(),
            s["detachable"].as_bool()
        ),
        (Some(session.as_str()), Some(false), Some(true))
    );
    assert!(s["exit_code"].is_null());
    let act: vmm_glue::proto::ActivityInfo =
        serde_json::from_value(a.call(Op::Activity, T).await.unwrap()).unwrap();
    assert_eq!(act.running_sessions, 1);
    // Attach: the scrollback has everything, then kill ends it.
    let mut at = a
        .open(Op::Attach {
            session: session.clone(),
        })
        .unwrap();
    match at.next().await {
        Some(Event::Output { data, .. }) => assert_eq!(data, b"one\ngot two\n"),
        other => panic!("{other:?}"),
    }
    a.call(
        Op::Kill {
            session: session.clone(),
            signal: 9,
        },
        T,
    )
    .await
    .unwrap();
    assert!(matches!(
        at.next().await,
        Some(Event::Exit {
            signal: Some(9),
            ..
        })
    ));
    let e = a
        .call(
            Op::Attach {
                session: "s999".into(),
            },
            T,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::Guest(m) if m.contains("no session")));
}

#[tokio::test]
async fn files_in_and_out() {
    let a = start();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sub/dir/f.bin").display().to_string();
    let data: Vec<u8> = (0..2_500_000u32).map(|i| (i * 7 % 256) as u8).collect();
    for (i, c) in data.chunks(vmm_glue::proto::MAX_CHUNK).enumerate() {
        a.call(
            Op::WriteFile {
                path: p.clone(),
                data: c.to_vec(),
                mode: Some(0o600),
                append: i > 0,
            },
            T,
        )
        .await
        .unwrap();
    }
    let mut back = Vec::new();
    loop {
        let v = a
            .call(
                Op::ReadFile {
                    path: p.clone(),
                    offset: back.len() as u64,
                    len: 1 << 20,
                },
                T,
            )
            .await
            .unwrap();
        back.extend(
            base64::engine::general_purpose::STANDARD
                .decode(v["data"].as_str().unwrap())
                .unwrap(),
        );
        if v["eof"].as_bool().unwrap() {
            break;
        }
    }
    assert_eq!(back, data);
    let l = a
        .call(
            Op::ListDir {
                path: dir.path().join("sub/dir").display().to_string(),
            },
            T,
        )
        .await
        .unwrap();
    assert_eq!(l[0]["name"], "f.bin");
    assert_eq!(l[0]["mode"], 0o600);
    assert_eq!(l[0]["size"], data.len());
    for op in [
        Op::ReadFile {
            path: "/no/such".into(),
            offset: 0,
            len: 10,
        },
        Op::ListDir {
            path: "/no/such".into(),
        },
        Op::WriteFile {
            path: "relative".into(),
            data: vec![],
            mode: None,
            append: false,
        },
        Op::ReadFile {
            path: dir.path().display().to_string(),
            offset: 0,
            len: 10,
        },
    ] {
        assert!(matches!(a.call(op, T).await, Err(AgentError::Guest(_))));
    }
}

#[tokio::test]
async fn tcp_tunnel_reaches_a_guest_port() {
    let a = start();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 5];
        std::io::Read::read_exact(&mut s, &mut buf).unwrap();
        std::io::Write::write_all(&mut s, &[buf, buf].concat()).unwrap();
    });
    let mut ev = a.open(Op::TcpOpen { port }).unwrap();
    assert!(matches!(ev.next().await, Some(Event::Ok { .. })));
    a.notify(Op::TcpSend {
        conn: ev.id,
        data: b"hello".to_vec(),
    })
    .unwrap();
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(T, ev.next()).await.unwrap() {
            Some(Event::TcpData { data }) => got.extend(data),
            Some(Event::TcpClosed) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, b"hellohello");
    // Nothing listening: an error, not a hang.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p2 = closed.local_addr().unwrap().port();
    drop(closed);
    assert!(matches!(
        a.call(Op::TcpOpen { port: p2 }, T).await,
        Err(AgentError::Guest(_))
    ));
}

#[tokio::test]
async fn malformed_frames_get_errors_and_the_agent_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
    let w = guest.try_clone().unwrap();
    let agent = Agent::new(Box::new(w), "/");
    std::thread::spawn(move || agent.serve(guest, false));
    host.set_nonblocking(true).unwrap();
    let mut h = tokio::net::UnixStream::from_std(host).unwrap();
    for body in [
        &b"not json"[..],
        b"{\"id\":5,\"op\":\"bogus\"}",
        b"{\"id\":6,\"op\":\"stdin\",\"session\":\"s1\",\"data\":\"%%%\"}",
    ] {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        h.write_all(&f).await.unwrap();
        let mut len = [0u8; 4];
        h.read_exact(&mut len).await.unwrap();
        let mut b = vec![0u8; u32::from_be_bytes(len) as usize];
        h.read_exact(&mut b).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["ev"], "error", "{v}");
    }
    let conn = AgentConn::from_stream(h);
    conn.call(Op::Ping, T).await.unwrap();
}
