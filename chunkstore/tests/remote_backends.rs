//! The shared object-store scenarios (tests/remote_common) against `memory://` and `file://`
//! (a temporary directory), opened through `RemoteConfig` as the daemon opens them.

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

mod remote_common;

use chunkstore::remote::{Remote, RemoteConfig};
use remote_common::UpdateSupport;
use tempfile::TempDir;
use url::Url;

fn open(url: &str) -> Remote {
    RemoteConfig {
        url: url.to_string(),
        ..RemoteConfig::default()
    }
    .open_with_env(&|_| None)
    .unwrap()
    .unwrap()
}

fn memory() -> Remote {
    open("memory:///test-prefix")
}

/// A `file://` store in a fresh directory; the directory lives as long as the guard.
fn file() -> (Remote, TempDir) {
    let dir = TempDir::new().unwrap();
    let url = Url::from_file_path(dir.path().join("bucket")).unwrap();
    (open(url.as_str()), dir)
}

/// A second, independent handle on the same directory (another daemon on the same host).
fn file_again(dir: &TempDir) -> Remote {
    let url = Url::from_file_path(dir.path().join("bucket")).unwrap();
    open(url.as_str())
}

#[tokio::test]
async fn memory_basic_ops() {
    remote_common::basic_ops(&memory()).await;
}

#[tokio::test]
async fn file_basic_ops() {
    let (r, _dir) = file();
    remote_common::basic_ops(&r).await;
}

#[tokio::test]
async fn memory_conditional_puts_create_and_update() {
    remote_common::conditional_puts(&memory(), UpdateSupport::Supported).await;
}

#[tokio::test]
async fn file_conditional_puts_create_only() {
    let (r, _dir) = file();
    remote_common::conditional_puts(&r, UpdateSupport::NotImplemented).await;
}

#[tokio::test]
async fn memory_lease_protocol() {
    remote_common::lease_protocol(&memory()).await;
}

#[tokio::test]
async fn file_lease_protocol() {
    let (r, dir) = file();
    remote_common::lease_protocol(&r).await;
    // The records are plain files under the directory.
    let gen_dir = dir.path().join("bucket/volumes/v/lease/gen");
    let names: Vec<_> = std::fs::read_dir(gen_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["00000000000000000004"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_lease_race() {
    let r = memory();
    // One store shared by all "daemons", with random delays so their requests interleave.
    let faults = chunkstore::remote::FaultConfig::seeded(
        chunkstore::remote::FaultSettings {
            jitter: std::time::Duration::from_millis(2),
            ..Default::default()
        },
        11,
    );
    let r = r.wrap(|s| std::sync::Arc::new(chunkstore::remote::FaultyStore::new(s, faults)));
    remote_common::lease_race(vec![r.clone(), r.clone(), r.clone(), r], 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_lease_race_between_separate_handles() {
    let (r, dir) = file();
    let handles = vec![r, file_again(&dir), file_again(&dir), file_again(&dir)];
    remote_common::lease_race(handles, 10).await;
}

#[tokio::test]
async fn memory_lease_under_faults() {
    remote_common::lease_under_faults(&memory(), 0..20).await;
}

#[tokio::test]
async fn file_lease_under_faults() {
    let (r, _dir) = file();
    remote_common::lease_under_faults(&r, 0..10).await;
}

#[tokio::test]
async fn memory_faults_metrics_retry() {
    remote_common::faults_metrics_retry(&memory()).await;
}

#[tokio::test]
async fn file_faults_metrics_retry() {
    let (r, _dir) = file();
    remote_common::faults_metrics_retry(&r).await;
}
