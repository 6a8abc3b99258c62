//! Bounded retries with jittered backoff, and a deadline per storage call,
//! so a flaky backend is retried a few times and a hung one cannot hold a
//! stream forever (threat plan C1, C4).

use std::future::Future;
use std::time::Duration;

use super::StoreError;

/// How the store retries one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubled each time, up to
    /// `max_backoff`, and jittered ("full jitter": uniform in [0, b]) so
    /// many streams hitting one outage do not retry in lock-step.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// One attempt taking longer than this counts as a transient failure.
    pub op_timeout: Duration,
}

impl Default for RetryPolicy {
    /// Local files: a few quick retries; a stuck mount gives up after two
    /// minutes per attempt rather than never.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            op_timeout: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// For a backend whose client already retries each request (the S3
    /// client's own `RetryConfig`): one attempt here, so retries do not
    /// multiply; the deadline still applies.
    pub fn client_retries(op_timeout: Duration) -> Self {
        Self { max_attempts: 1, op_timeout, ..Self::default() }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.base_backoff.saturating_mul(1u32 << attempt.min(16)).min(self.max_backoff);
        let r: [u8; 4] = crate::crypto::secret::random_bytes().unwrap_or([0xff; 4]);
        exp.mul_f64(f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX))
    }

    /// Runs `call` until it succeeds, fails permanently, or the attempts
    /// are used up. `op` names the operation in the final error.
    pub async fn run<T, F, Fut>(&self, op: &'static str, mut call: F) -> Result<T, StoreError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let attempts = self.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            let outcome = match tokio::time::timeout(self.op_timeout, call(attempt)).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::TimedOut(self.op_timeout)),
            };
            match outcome {
                Ok(v) => return Ok(v),
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => {
                    attempt += 1;
                    if attempt >= attempts {
                        tracing::warn!(op, attempts, error = %e, "object storage failed; giving up");
                        return Err(StoreError::Unavailable { op, attempts, last: e.to_string() });
                    }
                    tracing::info!(op, attempt, error = %e, "object storage failed; retrying");
                    tokio::time::sleep(self.backoff(attempt - 1)).await;
                }
            }
        }
    }

    /// `call` under the deadline only (a step that cannot be repeated, such
    /// as a part of a multipart upload already handed to the backend).
    pub async fn once<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.op_timeout, call).await {
            Ok(Err(e)) if e.is_transient() => Err(StoreError::Unavailable { op, attempts: 1, last: e.to_string() }),
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable {
                op,
                attempts: 1,
                last: StoreError::TimedOut(self.op_timeout).to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            base_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            op_timeout: Duration::from_secs(30),
        }
    }

    fn transient() -> StoreError {
        StoreError::Backend(object_store::Error::Generic { store: "test", source: "503".into() })
    }

    #[tokio::test]
    async fn c1_transient_failures_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let out = quick(3)
            .run("put", |_| async { if calls.fetch_add(1, Ordering::SeqCst) < 2 { Err(transient()) } else { Ok(7) } })
            .await
            .unwrap();
        assert_eq!((out, calls.load(Ordering::SeqCst)), (7, 3));
    }

    #[tokio::test]
    async fn c1_retries_are_bounded() {
        let calls = AtomicU32::new(0);
        let e = quick(3)
            .run("put", |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(transient())
            })
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Unavailable { attempts: 3, .. }), "{e:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn c4_permanent_failures_fail_fast() {
        let calls = AtomicU32::new(0);
        let e = quick(5)
            .run("put", |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(StoreError::from(object_store::Error::PermissionDenied {
                    path: "x".into(),
                    source: "403".into(),
                }))
            })
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Denied(_)), "{e:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn c1_a_hung_attempt_times_out_and_counts_as_transient() {
        let policy = RetryPolicy { op_timeout: Duration::from_millis(20), ..quick(2) };
        let calls = AtomicU32::new(0);
        let e = policy
            .run("get", |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<Result<(), StoreError>>()
            })
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Unavailable { attempts: 2, .. }), "{e:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn backoff_stays_within_its_cap() {
        let p = quick(3);
        for attempt in 0..40 {
            assert!(p.backoff(attempt) <= p.max_backoff);
        }
    }
}
