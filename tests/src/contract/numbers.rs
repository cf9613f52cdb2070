//! Contract case for exact JSON numbers (issue 19): payload and result numbers are kept exactly,
//! in the one form PostgreSQL's `jsonb` prints (plain decimal notation, the written scale), so
//! every adapter reads back the same text and tells the same requests apart.

use faultline_domain::{JobSpec, JobState};
use faultline_ports::LeaseRef;
use serde_json::Value;

use super::{Fixture, expect_conflict, expect_invalid};

fn parsed(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{text} is JSON: {e}"))
}

/// Numbers beyond `f64` stay exact in the payload and the result; another notation of the same
/// number is stored (and fingerprinted) in plain decimal form, `1` and `1.0` stay apart, two
/// integers that round to the same `f64` are different requests, and a number beyond what
/// `numeric` keeps is refused with nothing stored.
pub async fn payload_and_result_numbers_are_kept_exactly(f: Fixture) {
    let written = r#"{"big": 18446744073709551617, "d": 0.1000000000000000055511151231257827,
        "e": 1.50e1, "f": -0.0, "g": 1e2, "one": 1.0}"#;
    let stored = r#"{"big": 18446744073709551617, "d": 0.1000000000000000055511151231257827,
        "e": 15.0, "f": 0.0, "g": 100, "one": 1.0}"#;
    let job = f
        .enqueue(&JobSpec::new("n", parsed(written)).idempotency_key("n"))
        .await;
    assert_eq!(job.payload.to_string(), parsed(stored).to_string());
    assert_eq!(
        f.get(job.id).await.payload.to_string(),
        job.payload.to_string()
    );

    let replay = f
        .store
        .job_enqueue(&JobSpec::new("n", parsed(stored)).idempotency_key("n"))
        .await
        .expect("a replay");
    assert_eq!(
        (replay.created, replay.job.id),
        (false, job.id),
        "same numbers"
    );
    for other in [
        stored.replace("551617", "551616"),
        stored.replace("0.1000000000000000055511151231257827", "0.1"),
        stored.replace("\"g\": 100", "\"g\": 100.0"),
    ] {
        let spec = JobSpec::new("n", parsed(&other)).idempotency_key("n");
        expect_conflict(f.store.job_enqueue(&spec).await, "n", job.id);
    }

    let running = f.claim_job(&job, super::LEASE_MS).await;
    let result = parsed(r#"[18446744073709551617, 2.50e-2, -0]"#);
    let done = f
        .store
        .job_complete(LeaseRef::of(&running), Some(result))
        .await
        .expect("complete");
    assert_eq!(done.state, JobState::Succeeded);
    let kept = r#"[18446744073709551617,0.0250,0]"#;
    assert_eq!(
        done.result.as_ref().map(Value::to_string).as_deref(),
        Some(kept)
    );
    let again = f.get(job.id).await;
    assert_eq!(
        again.result.as_ref().map(Value::to_string).as_deref(),
        Some(kept)
    );

    let before = f.all_jobs().await;
    for text in [
        "1e-16384",
        "[1e131072]",
        r#"{"x": 0e-99999}"#,
        "1e1000000001",
    ] {
        let spec = JobSpec::new("n", parsed(text));
        expect_invalid(f.store.job_enqueue(&spec).await, text);
        expect_invalid(f.store.job_enqueue_many(&[spec]).await, text);
    }
    assert_eq!(f.all_jobs().await, before, "nothing was stored");
}
