//! Demo kinds, registered only with `--demo-handlers` (and by `faultline dev`): `noop`, `sleep`,
//! `fail` and `crash`, for trying Faultline out and for failure drills.

use std::time::Duration;

use faultline_worker::{Handler, JobContext, Outcome};
use serde_json::{Value, json};

/// The demo kinds, as registered.
pub(crate) const KINDS: [&str; 4] = ["noop", "sleep", "fail", "crash"];

/// `noop`: succeeds at once, with no result.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Noop;

#[async_trait::async_trait]
impl Handler for Noop {
    async fn run(&self, _ctx: JobContext) -> Outcome {
        Outcome::Complete(None)
    }
}

/// `sleep`: waits `{"ms": N}` milliseconds, then succeeds; stops early (retryable) when its
/// cancellation token fires.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sleep;

#[async_trait::async_trait]
impl Handler for Sleep {
    async fn run(&self, ctx: JobContext) -> Outcome {
        let Some(ms) = whole_number(&ctx.payload, "ms") else {
            return Outcome::Fail {
                error: r#"sleep needs a payload like {"ms": 1000}"#.to_owned(),
            };
        };
        tokio::select! {
            biased;
            () = ctx.cancel.cancelled() => Outcome::Retry {
                error: "sleep was cancelled".to_owned(),
                delay: None,
            },
            () = tokio::time::sleep(Duration::from_millis(ms)) => {
                Outcome::Complete(Some(json!({"slept_ms": ms})))
            }
        }
    }
}

/// `fail`: fails (retryably) the first `{"times": N}` attempts, then succeeds. An optional
/// `"delay_ms"` replaces the job's backoff between the failed attempts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fail;

#[async_trait::async_trait]
impl Handler for Fail {
    async fn run(&self, ctx: JobContext) -> Outcome {
        let Some(times) = whole_number(&ctx.payload, "times") else {
            return Outcome::Fail {
                error: r#"fail needs a payload like {"times": 2}"#.to_owned(),
            };
        };
        let attempt = u64::try_from(ctx.attempt).unwrap_or(0);
        if attempt <= times {
            Outcome::Retry {
                error: format!("failing on purpose: attempt {attempt} of the first {times}"),
                delay: whole_number(&ctx.payload, "delay_ms").map(Duration::from_millis),
            }
        } else {
            Outcome::Complete(Some(json!({"succeeded_on_attempt": attempt})))
        }
    }
}

/// `crash`: aborts the whole worker process (a poison pill for failure drills: the job's lease
/// runs out, it is rescued, and after `max_attempts` crashes it ends `failed`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Crash;

#[async_trait::async_trait]
impl Handler for Crash {
    async fn run(&self, ctx: JobContext) -> Outcome {
        tracing::error!(
            job_id = ctx.id,
            kind = %ctx.kind,
            attempt = ctx.attempt,
            fencing_token = ctx.fencing_token,
            "crash job: aborting the worker process on purpose"
        );
        std::process::abort()
    }
}

/// A non-negative whole number field of the payload.
fn whole_number(payload: &Value, field: &str) -> Option<u64> {
    payload.get(field)?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use tokio_util::sync::CancellationToken;

    fn ctx(kind: &str, payload: Value, attempt: i32) -> JobContext {
        JobContext {
            id: 7,
            queue: "default".into(),
            kind: kind.into(),
            payload,
            attempt,
            max_attempts: 5,
            fencing_token: attempt.into(),
            lease_expires_at: Utc::now(),
            cancel: CancellationToken::new(),
        }
    }

    #[tokio::test]
    async fn noop_succeeds() {
        assert_eq!(
            Noop.run(ctx("noop", json!(null), 1)).await,
            Outcome::Complete(None)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_sleeps_for_the_payload_duration() {
        let started = tokio::time::Instant::now();
        let outcome = Sleep.run(ctx("sleep", json!({"ms": 1500}), 1)).await;
        assert_eq!(outcome, Outcome::Complete(Some(json!({"slept_ms": 1500}))));
        assert_eq!(started.elapsed(), Duration::from_millis(1500));
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_stops_when_cancelled() {
        let job = ctx("sleep", json!({"ms": 3_600_000}), 1);
        let cancel = job.cancel.clone();
        let started = tokio::time::Instant::now();
        let run = tokio::spawn(async move { Sleep.run(job).await });
        tokio::time::sleep(Duration::from_millis(10)).await; // virtual time
        cancel.cancel();
        let outcome = run.await.unwrap();
        assert!(matches!(outcome, Outcome::Retry { .. }), "{outcome:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn sleep_without_a_duration_fails_permanently() {
        for payload in [
            json!({}),
            json!({"ms": -1}),
            json!({"ms": "1s"}),
            json!(null),
        ] {
            let outcome = Sleep.run(ctx("sleep", payload.clone(), 1)).await;
            assert!(matches!(outcome, Outcome::Fail { .. }), "{payload}");
        }
    }

    #[tokio::test]
    async fn fail_fails_the_first_n_attempts_then_succeeds() {
        let payload = json!({"times": 2});
        for attempt in 1..=2 {
            let outcome = Fail.run(ctx("fail", payload.clone(), attempt)).await;
            assert!(
                matches!(outcome, Outcome::Retry { delay: None, .. }),
                "{outcome:?}"
            );
        }
        assert_eq!(
            Fail.run(ctx("fail", payload, 3)).await,
            Outcome::Complete(Some(json!({"succeeded_on_attempt": 3})))
        );
        let delayed = Fail
            .run(ctx("fail", json!({"times": 1, "delay_ms": 50}), 1))
            .await;
        assert!(matches!(
            delayed,
            Outcome::Retry { delay: Some(d), .. } if d == Duration::from_millis(50)
        ));
        let zero = Fail.run(ctx("fail", json!({"times": 0}), 1)).await;
        assert!(matches!(zero, Outcome::Complete(_)));
        let bad = Fail.run(ctx("fail", json!({"times": "x"}), 1)).await;
        assert!(matches!(bad, Outcome::Fail { .. }));
    }
}
