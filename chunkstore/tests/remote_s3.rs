//! The object-store tier against a real S3 server: moto (`moto_server`, installed by
//! scripts/setup.sh into `$SPRITES_VENV`, default /opt/sprites-venv). Each test starts its own
//! server on a free port and kills it when done.
//!
//! Besides the shared scenarios (tests/remote_common), this checks what the lease design
//! relies on from S3: `If-None-Match: *` on PutObject (object_store's `PutMode::Create`)
//! answers 412 for an existing key, `If-Match` (`PutMode::Update`) answers 412 for a stale
//! ETag, and a LIST sees every completed PUT.
//!
//! Set `CHUNKSTORE_SKIP_S3_TESTS=1` to skip (they fail, not skip, when moto is missing).

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

mod remote_common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chunkstore::remote::{Remote, RemoteConfig, Target, is_transient};
use object_store::{ObjectStoreExt, PutPayload};
use remote_common::UpdateSupport;

const BUCKET: &str = "sprites-test";

/// A moto server on a free local port, killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    /// `None` when the S3 tests are switched off.
    fn start() -> Option<Moto> {
        if std::env::var_os("CHUNKSTORE_SKIP_S3_TESTS").is_some() {
            eprintln!("CHUNKSTORE_SKIP_S3_TESTS is set: skipping");
            return None;
        }
        let venv = std::env::var_os("SPRITES_VENV")
            .map_or_else(|| PathBuf::from("/opt/sprites-venv"), PathBuf::from);
        let bin = venv.join("bin/moto_server");
        assert!(
            bin.exists(),
            "{} not found: run scripts/setup.sh (or set CHUNKSTORE_SKIP_S3_TESTS=1)",
            bin.display()
        );
        let port = free_port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let mut moto = Moto { child, port };
        moto.wait_ready();
        let status = moto.http("PUT", &format!("/{BUCKET}"));
        assert_eq!(status, 200, "creating bucket {BUCKET}");
        Some(moto)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("moto_server exited early: {status}");
            }
            if self.try_http("GET", "/").is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn try_http(&self, method: &str, path: &str) -> Option<u16> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        resp.split_whitespace().nth(1)?.parse().ok()
    }

    /// A plain unsigned request (moto accepts one for bucket creation); the status code.
    fn http(&self, method: &str, path: &str) -> u16 {
        self.try_http(method, path)
            .unwrap_or_else(|| panic!("{method} {path}: no HTTP answer"))
    }

    /// A `Remote` on `s3://BUCKET/prefix` through this server, as the daemon opens it.
    fn remote(&self, prefix: &str) -> Remote {
        RemoteConfig {
            url: format!("s3://{BUCKET}/{prefix}"),
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
            allow_http: Some(true),
            ..RemoteConfig::default()
        }
        .open_with_env(&|_| None)
        .unwrap()
        .unwrap()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn s3_basic_ops() {
    let Some(moto) = Moto::start() else { return };
    remote_common::basic_ops(&moto.remote("basic")).await;
    // The prefix of the url is where the keys land.
    let whole = moto.remote("");
    let under: Vec<_> =
        futures::TryStreamExt::try_collect::<Vec<_>>(whole.store.list(Some(&"basic".into())))
            .await
            .unwrap();
    assert!(!under.is_empty());
}

#[tokio::test]
async fn s3_conditional_puts_create_and_update() {
    let Some(moto) = Moto::start() else { return };
    remote_common::conditional_puts(&moto.remote("cond"), UpdateSupport::Supported).await;
}

#[tokio::test]
async fn s3_lease_protocol() {
    let Some(moto) = Moto::start() else { return };
    remote_common::lease_protocol(&moto.remote("lease")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_lease_race_between_separate_clients() {
    let Some(moto) = Moto::start() else { return };
    let handles = (0..4).map(|_| moto.remote("race")).collect();
    remote_common::lease_race(handles, 5).await;
}

#[tokio::test]
async fn s3_lease_under_faults() {
    let Some(moto) = Moto::start() else { return };
    remote_common::lease_under_faults(&moto.remote("faulty"), 0..5).await;
}

#[tokio::test]
async fn s3_faults_metrics_retry() {
    let Some(moto) = Moto::start() else { return };
    remote_common::faults_metrics_retry(&moto.remote("metered")).await;
}

/// The AWS_* fallbacks reach a working client.
#[tokio::test]
async fn s3_settings_from_environment() {
    let Some(moto) = Moto::start() else { return };
    let endpoint = moto.endpoint();
    let env = move |name: &str| -> Option<String> {
        match name {
            "AWS_ENDPOINT_URL" => Some(endpoint.clone()),
            "AWS_ALLOW_HTTP" => Some("true".into()),
            "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY" => Some("test".into()),
            "AWS_DEFAULT_REGION" => Some("us-east-1".into()),
            _ => None,
        }
    };
    let cfg = RemoteConfig {
        url: format!("s3://{BUCKET}/from-env"),
        ..RemoteConfig::default()
    };
    assert!(matches!(
        cfg.resolve(&env).unwrap(),
        Some(Target::S3 {
            allow_http: true,
            ..
        })
    ));
    let r = cfg.open_with_env(&env).unwrap().unwrap();
    r.store
        .put(&r.key("k"), PutPayload::from_static(b"env"))
        .await
        .unwrap();
    let got = r
        .store
        .get(&r.key("k"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&got[..], b"env");
}

/// A missing bucket is a permanent error, not something to retry.
#[tokio::test]
async fn s3_missing_bucket_is_permanent() {
    let Some(moto) = Moto::start() else { return };
    let r = RemoteConfig {
        url: "s3://no-such-bucket/x".into(),
        endpoint: Some(moto.endpoint()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        allow_http: Some(true),
        ..RemoteConfig::default()
    }
    .open_with_env(&|_| None)
    .unwrap()
    .unwrap();
    let e = r
        .store
        .put(&r.key("k"), PutPayload::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(!is_transient(&e), "{e:?}");
}

/// A server that went away gives transient errors (connection refused), which the retry
/// policy retries.
#[tokio::test]
async fn s3_server_gone_is_transient() {
    let Some(mut moto) = Moto::start() else {
        return;
    };
    let r = moto.remote("gone");
    r.store
        .put(&r.key("k"), PutPayload::from_static(b"x"))
        .await
        .unwrap();
    moto.kill();
    let e = r.store.head(&r.key("k")).await.unwrap_err();
    assert!(
        is_transient(&e),
        "connection refused should be transient: {e:?}"
    );
}
