//! Usage sampling: the host's cumulative counters of each sprite (CPU-seconds, memory
//! MiB-seconds, running seconds) and blockd's storage figures, recorded in the owning
//! organization's database every `interval` and whenever usage is asked for. Usage over a
//! range is the growth of the counters between the range's first and last samples.

use crate::server::App;
use crate::store::{UsageSample, now_ms};
use std::time::Duration;

/// Records one sample of a sprite (best effort: a sprite the host does not know is skipped).
pub async fn sample_one(a: &App, org: &str, name: &str, internal: &str) {
    let Ok(u) = a.m.usage(internal).await else {
        return;
    };
    let c = &u["compute"];
    let s = &u["storage"];
    let head = s["head_bytes"].as_i64().unwrap_or(0);
    let ck = s["checkpoint_only_bytes"].as_i64().unwrap_or(0);
    let sample = UsageSample {
        at_ms: now_ms(),
        cpu_seconds: c["cpu_seconds"].as_f64().unwrap_or(0.0),
        memory_mib_seconds: c["memory_mib_seconds"].as_f64().unwrap_or(0.0),
        running_seconds: c["running_seconds"].as_f64().unwrap_or(0.0),
        head_bytes: head,
        checkpoint_bytes: ck,
        billable_bytes: head + ck,
    };
    if let Err(e) = a.cp.record_usage(org, name, &sample) {
        tracing::warn!(org, sprite = name, %e, "cannot record usage");
    }
}

/// Samples every sprite of every organization each `interval` until `stop`.
pub async fn run_sampler(a: App, interval: Duration, stop: tokio_util::sync::CancellationToken) {
    let mut iv = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = iv.tick() => {}
        }
        for org in a.cp.list_orgs() {
            let Ok(rows) = a.cp.sprites(&org, None, usize::MAX >> 1) else {
                continue;
            };
            for r in rows {
                sample_one(&a, &org, &r.name, &r.internal).await;
            }
        }
    }
}
