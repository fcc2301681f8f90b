//! Retrying object-store requests that failed for a reason that may go away.
//!
//! [`retry`] re-runs an operation with exponential backoff and jitter while its error is
//! *transient* ([`Retryable::is_transient`]) and the [`RetryPolicy`]'s attempt and time
//! budgets last. Transient: timeouts, connection errors, HTTP 5xx / 429 / 408, S3 `SlowDown`,
//! and faults a [`FaultyStore`](super::FaultyStore) injected as transient. Never retried:
//! `NotFound`, `AlreadyExists`, `Precondition`, `NotModified`, permission and configuration
//! errors: retrying cannot change their answer, and for conditional writes it would hide
//! a lost race.
//!
//! The S3 client of `object_store` already retries a few times inside one request (see
//! [`RemoteConfig`](super::RemoteConfig)); this layer is for outages longer than that and for
//! stores (local, memory, fault-injecting) that do not retry at all.
//!
//! Retrying a *conditional* write is not idempotent: if the first attempt succeeded but its
//! answer was lost, the retry reports `AlreadyExists` / `Precondition`. Callers of such writes
//! must be able to recognise their own object (the lease writes a random token for this).

use std::error::Error as StdError;
use std::fmt::Display;
use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use object_store::client::{HttpError, HttpErrorKind};
use rand::Rng;

use super::faults::InjectedFault;

/// How often and for how long [`retry`] tries.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included; at least one attempt is always made.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles (`multiplier`) for each further one.
    pub initial_backoff: Duration,
    /// Upper bound of one backoff.
    pub max_backoff: Duration,
    pub multiplier: f64,
    /// No attempt starts later than this after the first one began: a backoff that would
    /// end past it is not slept, the last error is returned instead.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            multiplier: 2.0,
            max_elapsed: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// A single attempt: no retries.
    pub fn never() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The backoff before attempt `attempt + 1` (`attempt` counts from 1), without jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = self.initial_backoff.as_secs_f64() * exp;
        if !secs.is_finite() || secs >= self.max_backoff.as_secs_f64() {
            self.max_backoff
        } else {
            Duration::from_secs_f64(secs)
        }
    }
}

/// Errors that know whether trying again may help.
pub trait Retryable {
    fn is_transient(&self) -> bool;
}

impl Retryable for object_store::Error {
    fn is_transient(&self) -> bool {
        is_transient(self)
    }
}

/// Whether an object-store error may succeed when the request is repeated.
pub fn is_transient(err: &object_store::Error) -> bool {
    match err {
        object_store::Error::Generic { source, .. } => source_is_transient(source.as_ref()),
        // NotFound, AlreadyExists, Precondition, NotModified, NotSupported, NotImplemented,
        // PermissionDenied, Unauthenticated, InvalidPath, UnknownConfigurationKey, JoinError
        // (a panic): the same request gets the same answer.
        _ => false,
    }
}

/// Walks the source chain for evidence: an injected fault says what it is; a network-level
/// error or a 5xx/429/408 status is transient; anything else (a local I/O error, a 4xx) is
/// not.
fn source_is_transient(err: &(dyn StdError + Send + Sync + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(fault) = e.downcast_ref::<InjectedFault>() {
            return fault.is_transient();
        }
        if let Some(http) = e.downcast_ref::<HttpError>() {
            // Everything below HTTP (connect, send, timeout, a body cut short) may work on
            // another connection; only an unknown kind is left to the rest of the chain.
            if http.kind() != HttpErrorKind::Unknown {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            use io::ErrorKind as K;
            if matches!(
                io.kind(),
                K::TimedOut
                    | K::ConnectionReset
                    | K::ConnectionAborted
                    | K::ConnectionRefused
                    | K::NotConnected
                    | K::BrokenPipe
                    | K::Interrupted
                    | K::UnexpectedEof
                    | K::WouldBlock
            ) {
                return true;
            }
        }
        let msg = e.to_string();
        if let Some(status) = status_in_message(&msg) {
            return status >= 500 || status == 429 || status == 408;
        }
        if [
            "SlowDown",
            "InternalError",
            "ServiceUnavailable",
            "RequestTimeout",
        ]
        .iter()
        .any(|code| msg.contains(code))
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// The HTTP status in object_store's "Server returned non-2xx status code: 503 ..." message
/// (its `RetryError` type is not public, so the message is what we can see).
fn status_in_message(msg: &str) -> Option<u16> {
    let at = msg.find("status code: ")? + "status code: ".len();
    let digits = msg.get(at..at + 3)?;
    digits.parse().ok()
}

/// Runs `f` until it succeeds, fails with a permanent error, or `policy` is exhausted; returns
/// the last result. `op_name` names the operation in logs.
pub async fn retry<T, E, F, Fut>(op_name: &str, policy: &RetryPolicy, mut f: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Retryable + Display,
{
    let start = Instant::now();
    let mut attempt: u32 = 1;
    loop {
        let err = match f().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if !err.is_transient() {
            return Err(err);
        }
        if attempt >= policy.max_attempts {
            tracing::warn!(op = op_name, attempt, error = %err, "object store: giving up after max attempts");
            return Err(err);
        }
        let delay = jitter(policy.backoff(attempt));
        if start.elapsed() + delay > policy.max_elapsed {
            tracing::warn!(op = op_name, attempt, error = %err, "object store: giving up, retry time budget spent");
            return Err(err);
        }
        tracing::debug!(op = op_name, attempt, delay_ms = delay.as_millis() as u64, error = %err, "object store: retrying");
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

/// "Equal jitter": half the backoff fixed, half random, so retries of many clients spread
/// out but none retries immediately.
fn jitter(backoff: Duration) -> Duration {
    let half = backoff / 2;
    if half.is_zero() {
        return backoff;
    }
    let extra = rand::rng().random_range(0..=half.as_nanos().min(u64::MAX as u128) as u64);
    half + Duration::from_nanos(extra)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::remote::faults::FaultKind;
    use crate::remote::op::Op;

    fn fast(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
            multiplier: 2.0,
            max_elapsed: Duration::from_secs(10),
        }
    }

    fn injected(kind: FaultKind) -> object_store::Error {
        InjectedFault { op: Op::Get, kind }.into_error()
    }

    fn not_found() -> object_store::Error {
        object_store::Error::NotFound {
            path: "x".into(),
            source: "gone".into(),
        }
    }

    #[test]
    fn classification() {
        assert!(is_transient(&injected(FaultKind::Transient)));
        assert!(is_transient(&injected(FaultKind::Timeout)));
        assert!(!is_transient(&injected(FaultKind::Permanent)));
        assert!(!is_transient(&not_found()));
        for e in [
            object_store::Error::AlreadyExists {
                path: "x".into(),
                source: "exists".into(),
            },
            object_store::Error::Precondition {
                path: "x".into(),
                source: "etag".into(),
            },
            object_store::Error::NotModified {
                path: "x".into(),
                source: "same".into(),
            },
        ] {
            assert!(!is_transient(&e), "{e}");
        }
        let generic = |msg: &str| object_store::Error::Generic {
            store: "S3",
            source: msg.to_string().into(),
        };
        assert!(is_transient(&generic(
            "Server returned non-2xx status code: 503 Service Unavailable: "
        )));
        assert!(is_transient(&generic(
            "Server returned non-2xx status code: 429 Too Many Requests: "
        )));
        assert!(!is_transient(&generic(
            "Server returned non-2xx status code: 400 Bad Request: "
        )));
        assert!(is_transient(&generic(
            "Server returned error response: <Code>SlowDown</Code>"
        )));
        assert!(!is_transient(&generic("something odd")));
        let io = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(io::Error::new(io::ErrorKind::ConnectionReset, "reset")),
        };
        assert!(is_transient(&io));
        let io = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(io::Error::new(io::ErrorKind::PermissionDenied, "no")),
        };
        assert!(!is_transient(&io));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            ..RetryPolicy::default()
        };
        assert_eq!(p.backoff(1), Duration::from_millis(10));
        assert_eq!(p.backoff(2), Duration::from_millis(20));
        assert_eq!(p.backoff(3), Duration::from_millis(40));
        assert_eq!(p.backoff(4), Duration::from_millis(50));
        assert_eq!(p.backoff(1000), Duration::from_millis(50));
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(10));
            assert!(
                j >= Duration::from_millis(5) && j <= Duration::from_millis(10),
                "{j:?}"
            );
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let r = retry("t", &fast(5), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n < 3 {
                Err(injected(FaultKind::Transient))
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(r.ok(), Some(3));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        for make in [not_found as fn() -> object_store::Error, || {
            injected(FaultKind::Permanent)
        }] {
            let calls = AtomicU32::new(0);
            let r: Result<(), _> = retry("t", &fast(5), || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(make())
            })
            .await;
            assert!(r.is_err());
            assert_eq!(calls.load(Ordering::SeqCst), 1);
        }
    }

    #[tokio::test]
    async fn attempts_are_bounded() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry("t", &fast(4), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(injected(FaultKind::Transient))
        })
        .await;
        assert!(r.is_err_and(|e| is_transient(&e)));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn time_is_bounded() {
        let policy = RetryPolicy {
            max_attempts: 1000,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(20),
            multiplier: 1.0,
            max_elapsed: Duration::from_millis(100),
        };
        let calls = AtomicU32::new(0);
        let start = Instant::now();
        let r: Result<(), _> = retry("t", &policy, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(injected(FaultKind::Transient))
        })
        .await;
        assert!(r.is_err());
        let n = calls.load(Ordering::SeqCst);
        // 100 ms budget, 10..20 ms per backoff: at most 11 attempts, and it did retry.
        assert!((2..=11).contains(&n), "{n} attempts");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn never_makes_one_attempt() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry("t", &RetryPolicy::never(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(injected(FaultKind::Transient))
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
