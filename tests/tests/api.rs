//! The user-facing API end to end: the real `blockd` and `sprite-api` (with QEMU under it),
//! raw HTTP for every endpoint's error paths and org isolation, the `sprite` CLI for the happy
//! paths, and control-plane recovery from the object store.

#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tests::{Daemon, bin_path, text};

const ADMIN: &str = "test-admin-token";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Api {
    child: Child,
    port: u16,
    proxy: u16,
    metrics: u16,
    log: PathBuf,
}

impl Api {
    fn start(dir: &Path, vmm: &Path, control: &Path, blockd: &Daemon) -> Api {
        let (port, proxy, metrics) = (free_port(), free_port(), free_port());
        let log = dir.with_extension("log");
        let mut c = Command::new(bin_path("sprite-api"));
        c.arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .arg("--vmm-dir")
            .arg(vmm)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--proxy-addr", &format!("127.0.0.1:{proxy}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
            .arg("--control-store")
            .arg(format!("file://{}", control.display()))
            .args(["--replicate-secs", "1", "--admin-token", ADMIN])
            .arg("--blockd-socket")
            .arg(blockd.data_dir.join("admin.sock"))
            .args(["--idle-warm-secs", "0", "--min-mem-available-mib", "0"])
            .arg("--accel-cache")
            .arg(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sprites-accel"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            );
        if let Ok(a) = std::env::var("SPRITES_GUEST_ACCEL") {
            c.args(["--accel", &a]);
        }
        let mut child = c.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            let exited = child.try_wait().unwrap().is_some();
            assert!(
                !exited && Instant::now() < deadline,
                "sprite-api did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Api {
            child,
            port,
            proxy,
            metrics,
            log,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        tests::terminate(&mut self.child, Duration::from_secs(90));
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One HTTP/1.1 request; returns (status, body).
fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = resp[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..i]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + n]);
        b = &b[i + 2 + n + 2..];
    }
    out
}

fn jhttp(port: u16, method: &str, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let b = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let (s, r) = http(port, method, path, token, &b);
    (s, serde_json::from_slice(&r).unwrap_or(Value::Null))
}

struct Cli {
    config: PathBuf,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        tests::run(
            Command::new(bin_path("sprite"))
                .env("SPRITE_CONFIG", &self.config)
                .args(args),
            Duration::from_secs(180),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "sprite {args:?}: {}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
        text(&o.stdout)
    }
}

#[test]
fn api_cli_isolation_and_control_plane_recovery() {
    let _lock = tests::guest_lock(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest"));
    let dir = tempfile::tempdir().unwrap();
    let blockd = Daemon::start(&dir.path().join("blockd"));
    let (apidir, vmm, control) = (
        dir.path().join("api"),
        dir.path().join("vmm"),
        dir.path().join("control"),
    );
    let mut api = Api::start(&apidir, &vmm, &control, &blockd);
    let p = api.port;

    // The OpenAPI document lists every route and needs no token.
    let (s, doc) = jhttp(p, "GET", "/v1/openapi.json", None, Value::Null);
    assert_eq!(s, 200);
    for path in [
        "/v1/sprites",
        "/v1/sprites/{name}/exec",
        "/v1/sprites/{name}/checkpoints/{id}/restore",
        "/v1/usage",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }

    // Auth: 401 without or with a bad token; 403 for the wrong kind of token.
    assert_eq!(jhttp(p, "GET", "/v1/sprites", None, Value::Null).0, 401);
    assert_eq!(
        jhttp(p, "GET", "/v1/sprites", Some("spr_x_y_z"), Value::Null).0,
        401
    );
    assert_eq!(
        jhttp(p, "GET", "/v1/sprites", Some(ADMIN), Value::Null).0,
        403
    );
    let (s, a) = jhttp(p, "POST", "/v1/orgs", Some(ADMIN), json!({"name": "acme"}));
    assert_eq!(s, 201, "{a}");
    let ta = a["token"].as_str().unwrap().to_string();
    let (_, b) = jhttp(p, "POST", "/v1/orgs", Some(ADMIN), json!({"name": "beta"}));
    let tb = b["token"].as_str().unwrap().to_string();
    assert_eq!(jhttp(p, "GET", "/v1/orgs", Some(&ta), Value::Null).0, 403);
    assert_eq!(
        jhttp(p, "POST", "/v1/orgs", Some(ADMIN), json!({"name": "acme"})).0,
        409
    );
    assert_eq!(
        jhttp(p, "POST", "/v1/orgs", Some(ADMIN), json!({"name": "Bad!"})).0,
        422
    );

    // Bad bodies and parameters.
    assert_eq!(
        http(p, "POST", "/v1/sprites", Some(&ta), b"{not json").0,
        400
    );
    assert_eq!(
        jhttp(
            p,
            "POST",
            "/v1/sprites",
            Some(&ta),
            json!({"name": "x", "bogus": 1})
        )
        .0,
        400
    );
    assert_eq!(
        jhttp(
            p,
            "POST",
            "/v1/sprites",
            Some(&ta),
            json!({"name": "Bad_Name"})
        )
        .0,
        422
    );
    assert_eq!(
        jhttp(
            p,
            "POST",
            "/v1/sprites",
            Some(&ta),
            json!({"name": "x", "settings": {"vcpus": 0}})
        )
        .0,
        422
    );
    assert_eq!(
        jhttp(p, "GET", "/v1/sprites?limit=0", Some(&ta), Value::Null).0,
        400
    );
    assert_eq!(
        jhttp(p, "GET", "/v1/sprites/nope", Some(&ta), Value::Null).0,
        404
    );

    // The CLI: login, create, exec, files, url, checkpoints, fork, usage.
    let cli = Cli {
        config: dir.path().join("cli.json"),
    };
    let url = format!("http://127.0.0.1:{p}");
    assert_eq!(
        cli.run(&["login", "--url", &url, "--token", "spr_bad_1_2"])
            .status
            .code(),
        Some(2)
    );
    cli.ok(&["login", "--url", &url, "--token", &ta]);
    assert!(cli.ok(&["create", "web"]).contains("web is active"));
    assert_eq!(cli.ok(&["exec", "--", "sh", "-c", "echo hello"]), "hello\n");
    assert_eq!(
        cli.run(&["exec", "--", "sh", "-c", "exit 4"]).status.code(),
        Some(4)
    );
    let local = dir.path().join("f.txt");
    std::fs::write(&local, b"content-1\n").unwrap();
    cli.ok(&["cp", local.to_str().unwrap(), ":/www/index.html"]);
    let back = dir.path().join("back.txt");
    cli.ok(&["cp", ":/www/index.html", back.to_str().unwrap()]);
    assert_eq!(std::fs::read(&back).unwrap(), b"content-1\n");
    cli.ok(&["exec", "--", "httpd", "-p", "8080", "-h", "/www"]);
    let list: Value = serde_json::from_str(&cli.ok(&["--json", "list"])).unwrap();
    assert_eq!(list[0]["name"], "web");
    let ck: Value =
        serde_json::from_str(&cli.ok(&["--json", "checkpoint", "create", "--comment", "one"]))
            .unwrap();
    assert_eq!(ck["id"], "v1");
    assert!(cli.ok(&["checkpoint", "list"]).contains("one"));
    assert!(cli.ok(&["url"]).contains("(private)"));

    // The sprite's URL: private by default (401 without a token, 404 for another org's token).
    let internal_path = "/s/acme--web/";
    assert_eq!(http(api.proxy, "GET", internal_path, None, b"").0, 401);
    assert_eq!(http(api.proxy, "GET", internal_path, Some(&tb), b"").0, 404);
    let (s, body) = http(api.proxy, "GET", internal_path, Some(&ta), b"");
    assert_eq!(
        (s, body.as_slice()),
        (200, &b"content-1\n"[..]),
        "{}",
        api.logs()
    );
    cli.ok(&["url", "--auth", "public"]);
    assert_eq!(http(api.proxy, "GET", internal_path, None, b"").0, 200);

    // Org isolation: beta sees nothing of acme's, everything is 404.
    for (m, path, body) in [
        ("GET", "/v1/sprites/web", Value::Null),
        (
            "PUT",
            "/v1/sprites/web",
            json!({"settings": {"idle_warm_secs": 5}}),
        ),
        ("DELETE", "/v1/sprites/web", Value::Null),
        ("POST", "/v1/sprites/web/exec", json!({"args": ["true"]})),
        ("GET", "/v1/sprites/web/sessions", Value::Null),
        ("POST", "/v1/sprites/web/hibernate", json!({})),
        ("GET", "/v1/sprites/web/fs/www/index.html", Value::Null),
        ("GET", "/v1/sprites/web/checkpoints", Value::Null),
        ("POST", "/v1/sprites/web/checkpoints", json!({})),
        (
            "POST",
            "/v1/sprites/web/checkpoints/v1/restore",
            Value::Null,
        ),
        (
            "POST",
            "/v1/sprites/web/fork",
            json!({"checkpoint": "v1", "name": "stolen"}),
        ),
        ("GET", "/v1/sprites/web/usage", Value::Null),
    ] {
        let (s, v) = jhttp(p, m, path, Some(&tb), body);
        assert_eq!(s, 404, "{m} {path} with another org's token: {v}");
    }
    let (_, l) = jhttp(p, "GET", "/v1/sprites", Some(&tb), Value::Null);
    assert_eq!(l["sprites"].as_array().unwrap().len(), 0);
    assert!(http(p, "PUT", "/v1/sprites/web/fs/root/x", Some(&tb), b"x").0 == 404);

    // Fork, usage, hibernate, conflicts.
    assert!(cli.ok(&["fork", "v1", "web2"]).contains("web2 is active"));
    assert_eq!(cli.run(&["fork", "v1", "web2"]).status.code(), Some(4));
    assert_eq!(
        cli.run(&["-s", "web2", "exec", "--", "cat", "/www/index.html"])
            .status
            .code(),
        Some(0)
    );
    let u: Value = serde_json::from_str(&cli.ok(&["usage"])).unwrap();
    assert!(
        u["cpu_seconds"].as_f64().unwrap() > 0.0 && u["head_bytes"].as_i64().unwrap() > 0,
        "{u}"
    );
    let ou: Value = serde_json::from_str(&cli.ok(&["usage", "--org"])).unwrap();
    assert_eq!(ou["sprites"].as_array().unwrap().len(), 2);
    assert!(
        cli.ok(&["hibernate", "--cold"])
            .contains("hibernated (cold)")
    );
    cli.ok(&["exec", "--", "true"]); // a cold wake

    // A detachable session driven over HTTP: stdin in, output through attach, kill.
    // The exec stream of a detachable command lasts as long as it runs: read its first event
    // and hang up (the session is detached, not killed).
    let started: Value = {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", p)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let body =
            br#"{"args":["sh","-c","while read l; do echo got:$l; done"],"detachable":true}"#;
        write!(
            c,
            "POST /v1/sprites/web/exec HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ta}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        c.write_all(body).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let text = loop {
            let n = c.read(&mut chunk).unwrap();
            assert!(
                n > 0,
                "exec stream ended early: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
            let t = String::from_utf8_lossy(&buf).to_string();
            if t.contains("\"session\"") && t.contains("}\n") {
                break t;
            }
        };
        let start = text.find("{\"event\"").unwrap();
        let end = start + text[start..].find('\n').unwrap();
        serde_json::from_str(&text[start..end]).unwrap()
    };
    let sid = started["session"].as_str().unwrap().to_string();
    let stdin_path = format!("/v1/sprites/web/sessions/{sid}/stdin");
    let (st, b) = http(p, "POST", &stdin_path, Some(&ta), b"ping\n");
    let (_, dbg) = jhttp(p, "GET", "/v1/sprites/web/sessions", Some(&ta), Value::Null);
    assert_eq!(st, 204, "{} {dbg} {started}", String::from_utf8_lossy(&b));
    assert_eq!(http(p, "POST", &stdin_path, Some(&tb), b"x\n").0, 404);
    assert_eq!(
        http(
            p,
            "POST",
            "/v1/sprites/web/sessions/s999/stdin",
            Some(&ta),
            b"x"
        )
        .0,
        404
    );
    std::thread::sleep(Duration::from_millis(500));
    let (_, sess) = jhttp(p, "GET", "/v1/sprites/web/sessions", Some(&ta), Value::Null);
    assert!(
        sess["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == sid.as_str()),
        "{sess}"
    );
    // attach streams until the session ends: kill it from another connection meanwhile.
    let (ta2, sid2) = (ta.clone(), sid.clone());
    let attach = std::thread::spawn(move || {
        http(
            p,
            "GET",
            &format!("/v1/sprites/web/sessions/{sid2}/attach"),
            Some(&ta2),
            b"",
        )
    });
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        jhttp(
            p,
            "DELETE",
            &format!("/v1/sprites/web/sessions/{sid}"),
            Some(&ta),
            Value::Null
        )
        .0,
        204
    );
    let (s, body) = attach.join().unwrap();
    assert_eq!(s, 200);
    let body = String::from_utf8_lossy(&body).to_string();
    assert!(
        body.contains("Z290OnBpbmcK"),
        "attach shows the scrollback (got:ping): {body}"
    );
    assert!(body.contains("\"signal\":9"), "{body}");
    // Restore through the API: a changed file comes back as it was at v1.
    std::fs::write(&local, b"content-2\n").unwrap();
    cli.ok(&["cp", local.to_str().unwrap(), ":/www/index.html"]);
    cli.ok(&["exec", "--", "sync"]);
    let (s, r) = jhttp(
        p,
        "POST",
        "/v1/sprites/web/checkpoints/v1/restore",
        Some(&ta),
        Value::Null,
    );
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["sprite"]["state"], "active", "{r}");
    assert!(r["previous_head"].as_str().unwrap().starts_with('v'), "{r}");
    assert_eq!(
        cli.ok(&["exec", "--", "cat", "/www/index.html"]),
        "content-1\n"
    );
    assert_eq!(
        jhttp(
            p,
            "POST",
            "/v1/sprites/web/checkpoints/v99/restore",
            Some(&ta),
            Value::Null
        )
        .0,
        404
    );
    // A checkpoint by id, and deleting one.
    let (s, one) = jhttp(
        p,
        "GET",
        "/v1/sprites/web/checkpoints/v1",
        Some(&ta),
        Value::Null,
    );
    assert_eq!((s, one["comment"].as_str()), (200, Some("one")));
    let (_, ck2) = jhttp(
        p,
        "POST",
        "/v1/sprites/web/checkpoints",
        Some(&ta),
        json!({"comment": "two"}),
    );
    let id2 = ck2["id"].as_str().unwrap().to_string();
    assert_eq!(
        jhttp(
            p,
            "DELETE",
            &format!("/v1/sprites/web/checkpoints/{id2}"),
            Some(&ta),
            Value::Null
        )
        .0,
        204
    );
    assert_eq!(
        jhttp(
            p,
            "GET",
            &format!("/v1/sprites/web/checkpoints/{id2}"),
            Some(&ta),
            Value::Null
        )
        .0,
        404
    );
    cli.ok(&["destroy", "web2"]);

    // Tokens: create, use, revoke.
    let t2 = cli.ok(&["token", "ci"]).trim().to_string();
    assert_eq!(
        jhttp(p, "GET", "/v1/sprites", Some(&t2), Value::Null).0,
        200
    );
    let (_, toks) = jhttp(p, "GET", "/v1/tokens", Some(&ta), Value::Null);
    let id = toks["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        jhttp(
            p,
            "DELETE",
            &format!("/v1/tokens/{id}"),
            Some(&ta),
            Value::Null
        )
        .0,
        204
    );
    assert_eq!(
        jhttp(p, "GET", "/v1/sprites", Some(&t2), Value::Null).0,
        401
    );

    // Metrics.
    let (s, m) = http(api.metrics, "GET", "/metrics", None, b"");
    let m = String::from_utf8_lossy(&m).to_string();
    assert_eq!(s, 200);
    assert!(
        m.contains("sprites_api_requests_total{route=\"/v1/sprites\""),
        "{m}"
    );
    assert!(m.contains("sprites_by_state{state=\"active\"} 1"), "{m}");
    assert!(
        m.contains("sprites_operation_duration_seconds_count{op=\"fork\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("sprites_operation_duration_seconds_count{op=\"cold_wake\"} 1"),
        "{m}"
    );
    // The Grafana dashboard only queries documented metrics.
    let dash = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/grafana/sprites.json"
    ))
    .unwrap();
    let metrics_doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
            .unwrap();
    let dash: Value = serde_json::from_str(&dash).unwrap();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("sprites_")
                    || word.starts_with("blockd_")
                    || word.starts_with("chunkstore_")
                {
                    let base = word.trim_end_matches("_bucket");
                    assert!(
                        metrics_doc.contains(&format!("`{base}")),
                        "dashboard queries undocumented {word}"
                    );
                }
            }
        }
    }
    // Every API metric docs/metrics.md documents is exposed.
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .unwrap();
    for line in doc.lines().filter(|l| l.starts_with("| `sprites_")) {
        let name = line.split('`').nth(1).unwrap();
        let base = name.trim_end_matches("_total");
        assert!(
            m.contains(base),
            "{name} is documented but not exposed:\n{m}"
        );
    }

    // Control-plane recovery: stop the API, wipe its local state, start on the same bucket.
    api.stop();
    std::fs::remove_dir_all(&apidir).unwrap();
    let api2 = Api::start(&apidir, &vmm, &control, &blockd);
    let p = api2.port;
    let (_, orgs) = jhttp(p, "GET", "/v1/orgs", Some(ADMIN), Value::Null);
    assert_eq!(orgs["orgs"], json!(["acme", "beta"]));
    assert_eq!(
        jhttp(p, "GET", "/v1/sprites", Some(&t2), Value::Null).0,
        401,
        "revoked stays revoked"
    );
    let (s, v) = jhttp(p, "GET", "/v1/sprites/web", Some(&ta), Value::Null);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "hibernated");
    let (_, cks) = jhttp(
        p,
        "GET",
        "/v1/sprites/web/checkpoints",
        Some(&ta),
        Value::Null,
    );
    assert!(
        cks["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == "v1" && c["comment"] == "one"),
        "{cks}"
    );
    let (s, out) = http(
        p,
        "POST",
        "/v1/sprites/web/exec",
        Some(&ta),
        br#"{"args":["cat","/www/index.html"]}"#,
    );
    assert_eq!(s, 200);
    assert!(
        String::from_utf8_lossy(&out).contains("Y29udGVudC0xCg=="),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(
        jhttp(p, "DELETE", "/v1/sprites/web", Some(&ta), Value::Null).0,
        204
    );
}

/// schemathesis (PyPI, installed by scripts/setup.sh) against the served OpenAPI document:
/// every operation except `POST /v1/sprites` (each create boots a VM, ~6 s under TCG), with
/// an organization's token. No sprite matches its random names, so sprite operations exercise
/// auth, body and parameter parsing, validation and not-found paths. No 5xx may appear.
/// The state of a service, from outside (`sprite --json services get`).
fn service_state(cli: &Cli, name: &str) -> Value {
    let v: Value = serde_json::from_str(&cli.ok(&["--json", "services", "get", name])).unwrap();
    v["state"].clone()
}

fn wait_service(cli: &Cli, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = service_state(cli, name);
        if f(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{name}: {what}; last state {st}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The sprite's state without waking it.
fn sprite_state(p: u16, token: &str, name: &str) -> (String, String) {
    let (_, v) = jhttp(
        p,
        "GET",
        &format!("/v1/sprites/{name}"),
        Some(token),
        Value::Null,
    );
    (
        v["state"].as_str().unwrap_or("").to_string(),
        v["pause"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn services_and_tasks_in_a_sprite() {
    let _lock = tests::guest_lock(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest"));
    let dir = tempfile::tempdir().unwrap();
    let blockd = Daemon::start(&dir.path().join("blockd"));
    let api = Api::start(
        &dir.path().join("api"),
        &dir.path().join("vmm"),
        &dir.path().join("control"),
        &blockd,
    );
    let p = api.port;
    let (_, org) = jhttp(p, "POST", "/v1/orgs", Some(ADMIN), json!({"name": "acme"}));
    let token = org["token"].as_str().unwrap().to_string();
    let cli = Cli {
        config: dir.path().join("cli.json"),
    };
    cli.ok(&[
        "login",
        "--url",
        &format!("http://127.0.0.1:{p}"),
        "--token",
        &token,
    ]);
    cli.ok(&["create", "svc"]);
    cli.ok(&["url", "--auth", "public"]);
    let sh = |line: &str| cli.ok(&["exec", "--", "sh", "-c", line]);

    // Inside: sprite-env creates services over /.sprite/api.sock.
    sh("mkdir -p /www && echo served-by-service > /www/index.html");
    sh(
        "sprite-env services create web --cmd httpd --args -f,-p,3000,-h,/www --http-port 3000 --no-stream",
    );
    let o = cli.run(&[
        "exec",
        "--",
        "sprite-env",
        "services",
        "create",
        "web2",
        "--cmd",
        "httpd",
        "--args",
        "-f,-p,3001",
        "--http-port",
        "3001",
        "--no-stream",
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a second http port: {}",
        text(&o.stdout)
    );
    assert!(text(&o.stderr).contains("409"), "{}", text(&o.stderr));
    // A bad --cmd: the creation stream shows its exit.
    let stream = sh("sprite-env services create bad --cmd /no/such/program --duration 2s");
    let events: Vec<Value> = stream
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not NDJSON: {stream}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "exit" && e["timestamp"].is_u64()),
        "{stream}"
    );
    assert_eq!(events.last().unwrap()["type"], "complete", "{stream}");
    assert!(
        events.last().unwrap()["log_files"][0]
            .as_str()
            .unwrap()
            .ends_with("/.sprite/logs/services/bad.log")
    );
    cli.ok(&["services", "delete", "bad"]);
    // Dependencies, a crashing service, a service killed by a signal, one stopped on purpose.
    sh(
        "sprite-env services create first --cmd sh --args '-c,echo first >> /root/order; exec sleep 100000' --no-stream",
    );
    sh(
        "sprite-env services create second --cmd sh --args '-c,sleep 3; echo second >> /root/order; exec sleep 100000' --needs first --no-stream",
    );
    sh("sprite-env services create crash --cmd sh --args '-c,echo dying; exit 1' --no-stream");
    sh("sprite-env services create sticky --cmd sleep --args 100000 --no-stream");
    // Outside: the same services through the API and the `sprite` CLI.
    let (s, list) = jhttp(
        p,
        "GET",
        "/v1/sprites/svc/services",
        Some(&token),
        Value::Null,
    );
    assert_eq!(s, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["crash", "first", "second", "sticky", "web"],
        "{list}"
    );
    // Waits for a backoff between runs: while a restarted run is briefly up, `error` is
    // cleared.
    let crash = wait_service(&cli, "crash", "restarts with backoff", |st| {
        st["restart_count"].as_u64() >= Some(2) && st["error"].is_string()
    });
    assert!(
        crash["error"].as_str().unwrap_or("").contains("code 1"),
        "{crash}"
    );
    let log = sh("cat /.sprite/logs/services/crash.log");
    assert!(log.contains("[stdout] dying"), "{log}");
    cli.ok(&["services", "stop", "crash"]);
    let pid = service_state(&cli, "sticky")["pid"].as_u64().unwrap();
    cli.ok(&["services", "signal", "sticky", "KILL"]);
    let st = wait_service(&cli, "sticky", "restarted after SIGKILL", |st| {
        st["restart_count"] == 1 && st["status"] == "running"
    });
    assert_ne!(st["pid"].as_u64().unwrap(), pid);
    cli.ok(&["services", "stop", "sticky"]);
    assert_eq!(service_state(&cli, "sticky")["status"], "stopped");
    assert_eq!(
        cli.run(&["services", "get", "nope"]).status.code(),
        Some(3),
        "an unknown service is not found"
    );
    let (s, _) = jhttp(
        p,
        "PUT",
        "/v1/sprites/svc/services/x?duration=0",
        Some(&token),
        json!({"cmd": "true", "bogus": 1}),
    );
    assert_eq!(s, 400);

    // Warm: the VM is paused with its processes; they resume, not restart.
    let web = service_state(&cli, "web");
    cli.ok(&["hibernate"]);
    assert_eq!(
        sprite_state(p, &token, "svc"),
        ("hibernated".into(), "warm".into())
    );
    let web2 = service_state(&cli, "web"); // wakes it
    assert_eq!(
        (web2["pid"].clone(), web2["started_at"].clone()),
        (web["pid"].clone(), web["started_at"].clone())
    );
    assert_eq!(service_state(&cli, "sticky")["status"], "stopped");

    // Cold, with the HTTP service stopped: a request to the URL boots the sprite, the runtime
    // starts the services (in `needs` order, not the stopped ones) and the proxy starts the
    // HTTP service before forwarding.
    cli.ok(&["services", "stop", "web"]);
    cli.ok(&["hibernate", "--cold"]);
    assert_eq!(
        sprite_state(p, &token, "svc"),
        ("hibernated".into(), "cold".into())
    );
    let (s, body) = http(api.proxy, "GET", "/s/acme--svc/", None, b"");
    assert_eq!(
        (s, String::from_utf8_lossy(&body).to_string()),
        (200, "served-by-service\n".to_string()),
        "{}",
        api.logs()
    );
    assert_eq!(service_state(&cli, "web")["status"], "running");
    assert_eq!(service_state(&cli, "sticky")["status"], "stopped");
    assert_eq!(service_state(&cli, "crash")["status"], "stopped");
    let first = wait_service(&cli, "first", "runs after the boot", |st| {
        st["status"] == "running"
    });
    let second = wait_service(&cli, "second", "runs after the boot", |st| {
        st["status"] == "running"
    });
    assert!(
        first["started_at"].as_str().unwrap() <= second["started_at"].as_str().unwrap(),
        "{first} {second}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut order = sh("cat /root/order");
    while order.lines().count() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        order = sh("cat /root/order");
    }
    assert_eq!(order, "first\nsecond\nfirst\nsecond\n");

    // Tasks API inside: every status code (through `sprite-env curl`, the real curl).
    let code = |args: &str| {
        sh(&format!(
            "sprite-env curl -o /dev/null -w '%{{http_code}}' {args}"
        ))
    };
    assert_eq!(
        code(r#"-X POST -d '{"name":"t1","expire":"30m"}' /v1/tasks"#),
        "201"
    );
    assert_eq!(
        code(r#"-X POST -d '{"name":"t1","expire":60}' /v1/tasks"#),
        "409"
    );
    assert_eq!(
        code(r#"-X POST -d '{"name":"t2","expire":"2h"}' /v1/tasks"#),
        "400"
    );
    assert_eq!(code(r#"-X POST -d 'nope' /v1/tasks"#), "400");
    assert_eq!(code(r#"-X PUT -d '{"expire":"10m"}' /v1/tasks/t2"#), "200");
    assert_eq!(
        code(r#"-X PUT -d '{"name":"t2","expire":30}' /v1/tasks"#),
        "200"
    );
    assert_eq!(code("/v1/tasks/t2"), "200");
    assert_eq!(code("/v1/tasks/t9"), "404");
    assert_eq!(code("-X DELETE /v1/tasks/t2"), "204");
    assert_eq!(code("-X DELETE /v1/tasks/t2"), "404");
    let tasks: Value = serde_json::from_str(&sh("sprite-env curl /v1/tasks")).unwrap();
    assert_eq!(tasks["tasks"][0]["name"], "t1", "{tasks}");
    sh("sprite-env tasks delete t1");

    // A task keeps the sprite up past its idle timeout; it pauses once the task expires.
    let (s, _) = jhttp(
        p,
        "PUT",
        "/v1/sprites/svc",
        Some(&token),
        json!({"settings": {"idle_warm_secs": 2}}),
    );
    assert_eq!(s, 200);
    sh("sprite-env tasks create job --expire 20");
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        sprite_state(p, &token, "svc").0,
        "active",
        "paused while a task was live"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while sprite_state(p, &token, "svc").0 != "hibernated" {
        assert!(
            Instant::now() < deadline,
            "did not pause after the task expired"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        t0.elapsed() >= Duration::from_secs(18),
        "paused before the task expired"
    );
    // ... or once it is deleted.
    sh("sprite-env tasks create job2 --expire 1h");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        sprite_state(p, &token, "svc").0,
        "active",
        "paused while a task was live"
    );
    sh("sprite-env tasks delete job2");
    let deadline = Instant::now() + Duration::from_secs(60);
    while sprite_state(p, &token, "svc").0 != "hibernated" {
        assert!(
            Instant::now() < deadline,
            "did not pause after the task was deleted"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn schemathesis_finds_no_server_errors() {
    let st =
        PathBuf::from(std::env::var("SPRITES_VENV").unwrap_or_else(|_| "/opt/sprites-venv".into()))
            .join("bin/st");
    assert!(
        st.exists(),
        "{} missing: run scripts/setup.sh",
        st.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let blockd = Daemon::start(&dir.path().join("blockd"));
    let api = Api::start(
        &dir.path().join("api"),
        &dir.path().join("vmm"),
        &dir.path().join("control"),
        &blockd,
    );
    let (s, org) = jhttp(
        api.port,
        "POST",
        "/v1/orgs",
        Some(ADMIN),
        json!({"name": "fuzz"}),
    );
    assert_eq!(s, 201);
    let token = org["token"].as_str().unwrap();
    let o = tests::run(
        Command::new(&st)
            .args([
                "run",
                &format!("http://127.0.0.1:{}/v1/openapi.json", api.port),
            ])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args([
                "--checks",
                "not_a_server_error",
                "--exclude-operation-id",
                "post_sprites",
            ])
            .args([
                "-n",
                "25",
                "--phases",
                "coverage,fuzzing",
                "--generation-deterministic",
            ])
            .env("NO_COLOR", "1")
            // schemathesis keeps a cache in its working directory.
            .current_dir(dir.path()),
        Duration::from_secs(600),
    );
    let out = format!("{}{}", text(&o.stdout), text(&o.stderr));
    assert!(
        o.status.success(),
        "schemathesis found failures:\n{out}\n--- API log ---\n{}",
        api.logs()
    );
    assert!(out.contains("passed"), "{out}");
}
