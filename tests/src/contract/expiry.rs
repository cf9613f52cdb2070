//! Contract cases for the end of a lease: what a holder's write on an expired but not yet
//! rescued lease does (it applies: a lease holds until it is rescued or expired by an operator),
//! and the operator's "expire lease now" (`job_expire_lease`), which ends a lease at once as its
//! rescue would and fences its holder off.

use faultline_domain::{Event, EventKind, FailureKind, Job, JobSpec, JobState};
use faultline_ports::{HeartbeatOutcome, LeaseRef};
use serde_json::json;

use super::{
    Fixture, LEASE_MS, applied, expect_every_write_stale, expect_illegal, expect_not_found,
    expiry_error, failure, ms, spec,
};

/// A lease whose end has passed but that no rescue has ended yet still holds: its holder's
/// heartbeat extends it again (and the rescue then leaves the job alone), and its completion,
/// failure and snooze apply as on a live lease. Only the rescue (or an operator's expiry) ends
/// it; from then on every write with its token is stale.
pub async fn writes_on_an_expired_lease_apply_until_it_is_rescued(f: Fixture) {
    let mut held = Vec::new();
    for queue in ["beat", "done", "fail", "snooze", "gone"] {
        let job = f.enqueue(&spec(queue)).await;
        held.push(f.claim_job(&job, 1_000).await);
    }
    let [beat, done, fail, snooze, gone] = <[Job; 5]>::try_from(held).expect("five jobs");
    f.advance(5_000);
    let now = f.now();
    assert!(
        [&beat, &done, &fail, &snooze, &gone]
            .iter()
            .all(|job| job.lease_expires_at < Some(now)),
        "every lease has ended by the clock"
    );

    // A heartbeat revives the lease; the rescue no longer sees it as expired.
    let beats = f
        .store
        .job_heartbeat_many(&[LeaseRef::of(&beat)], LEASE_MS)
        .await
        .expect("heartbeat");
    assert_eq!(
        beats,
        vec![HeartbeatOutcome::Extended {
            lease_expires_at: now + ms(LEASE_MS),
            cancel_requested: false,
        }]
    );
    let beat = applied(
        &beat,
        Event::Heartbeat {
            token: 1,
            now,
            extend_ms: LEASE_MS,
        },
    );
    assert_eq!(f.get(beat.id).await, beat);

    // Completion, failure and snooze apply as on a live lease.
    let completed = f
        .store
        .job_complete(LeaseRef::of(&done), Some(json!({"late": "but held"})))
        .await
        .expect("a completion on an expired, unrescued lease applies");
    assert_eq!(
        completed,
        applied(
            &done,
            Event::Complete {
                token: 1,
                now,
                result: Some(json!({"late": "but held"})),
            }
        )
    );
    let failed = f
        .store
        .job_fail(LeaseRef::of(&fail), &failure("late", true, Some(0)))
        .await
        .expect("a failure on an expired, unrescued lease applies");
    assert_eq!(
        failed,
        applied(
            &fail,
            Event::FailRetryable {
                token: 1,
                now,
                error: "late".into(),
                kind: FailureKind::Error,
                delay_ms: 0,
            }
        )
    );
    let snoozed = f
        .store
        .job_snooze(LeaseRef::of(&snooze), 0)
        .await
        .expect("a snooze on an expired, unrescued lease applies");
    assert_eq!(
        snoozed,
        applied(
            &snooze,
            Event::Snooze {
                token: 1,
                now,
                delay_ms: 0,
            }
        )
    );

    // The rescue ends only the lease nobody wrote to; then its holder is fenced off.
    let rescued = f.store.job_rescue_expired(100).await.expect("rescue");
    let gone = applied(
        &gone,
        Event::LeaseExpired {
            now,
            delay_ms: 1_000,
        },
    );
    assert_eq!(rescued, vec![gone.clone()]);
    expect_every_write_stale(
        &f,
        LeaseRef {
            job_id: gone.id,
            token: 1,
        },
    )
    .await;
    assert_eq!(f.get(gone.id).await, gone, "stale writes changed nothing");
    assert_eq!(
        f.get(beat.id).await,
        beat,
        "the revived lease is still held"
    );
}

/// `job` with its lease ending at `now` at the latest: what an operator's expiry applies
/// `LeaseExpired` to.
fn lease_ended(job: &Job, now: chrono::DateTime<chrono::Utc>) -> Job {
    let mut job = job.clone();
    job.lease_expires_at = job.lease_expires_at.map(|end| end.min(now));
    job
}

/// "Expire lease now" ends a running job's lease at once, whatever its end, as the rescue of an
/// expired lease would: a failed attempt of kind `lease_expired`, retried with backoff, `failed`
/// when the attempts are spent, `cancelled` when a cancel was requested. The holder's heartbeat
/// then reports the lease lost and its writes are stale; the job can be leased again. A job that
/// is not running is an illegal transition, an unknown id not found; neither changes anything.
pub async fn expire_lease_ends_a_running_lease_now_as_a_rescue_would(f: Fixture) {
    const YEAR_MS: i64 = 365 * 86_400_000;
    let job = f.enqueue(&spec("long")).await;
    let held = f.claim_job(&job, YEAR_MS).await;
    f.advance(100);
    let now = f.now();
    let expired = f.store.job_expire_lease(held.id).await.expect("expire");
    let expected = applied(
        &lease_ended(&held, now),
        Event::LeaseExpired {
            now,
            delay_ms: 1_000,
        },
    );
    assert_eq!(expired, expected);
    assert_eq!(expired.state, JobState::Queued);
    assert_eq!(expired.attempts, 1, "the attempt counts");
    assert_eq!(
        expired.next_run_at,
        now + ms(1_000),
        "the backoff of attempt 1"
    );
    assert_eq!(expired.last_error, Some(expiry_error("w1", 1)));
    let entry = expired.errors.last().expect("an attempt history entry");
    assert_eq!(
        (entry.attempt, entry.kind, entry.fencing_token, entry.at),
        (1, FailureKind::LeaseExpired, 1, now)
    );
    assert_eq!(entry.worker.as_deref(), Some("w1"));
    assert_eq!(f.get(held.id).await, expected);

    // The holder is fenced off: its heartbeat says lost, every write is stale.
    let lease = LeaseRef::of(&held);
    assert_eq!(
        f.store
            .job_heartbeat_many(&[lease], LEASE_MS)
            .await
            .expect("heartbeat"),
        vec![HeartbeatOutcome::Lost]
    );
    expect_every_write_stale(&f, lease).await;
    assert_eq!(
        f.get(held.id).await,
        expected,
        "stale writes changed nothing"
    );
    // Nothing is left to rescue, and a queued job has no lease to expire.
    assert_eq!(
        f.store.job_rescue_expired(100).await.expect("rescue"),
        vec![]
    );
    expect_illegal(
        f.store.job_expire_lease(held.id).await,
        held.id,
        JobState::Queued,
        EventKind::LeaseExpired,
    );
    // It is leased again as attempt 2 under a new token.
    f.advance(1_000);
    let second = f.claim_job(&job, LEASE_MS).await;
    assert_eq!((second.attempts, second.fencing_token), (2, 2));

    // A lease already past its end (not yet rescued) ends the same way.
    f.advance(LEASE_MS + 500);
    let now = f.now();
    let late = f.store.job_expire_lease(second.id).await.expect("expire");
    assert_eq!(
        late,
        applied(
            &second,
            Event::LeaseExpired {
                now,
                delay_ms: 2_000,
            }
        )
    );
    assert_eq!(
        f.store.job_rescue_expired(100).await.expect("rescue"),
        vec![]
    );

    // The last attempt: the job fails.
    let one = f
        .enqueue(&JobSpec {
            max_attempts: 1,
            ..spec("one")
        })
        .await;
    let one = f.claim_job(&one, YEAR_MS).await;
    let now = f.now();
    let failed = f.store.job_expire_lease(one.id).await.expect("expire");
    assert_eq!(
        failed,
        applied(
            &lease_ended(&one, now),
            Event::LeaseExpired { now, delay_ms: 0 }
        )
    );
    assert_eq!(
        (failed.state, failed.finished_at),
        (JobState::Failed, Some(now))
    );
    expect_illegal(
        f.store.job_expire_lease(one.id).await,
        one.id,
        JobState::Failed,
        EventKind::LeaseExpired,
    );
    assert_eq!(f.get(one.id).await, failed);

    // A cancel was requested: the job ends cancelled.
    let marked = f.running("cancel").await;
    let marked = f.store.job_cancel(marked.id).await.expect("cancel");
    assert!(marked.cancel_requested);
    f.advance(10);
    let now = f.now();
    let cancelled = f.store.job_expire_lease(marked.id).await.expect("expire");
    assert_eq!(
        cancelled,
        applied(
            &lease_ended(&marked, now),
            Event::LeaseExpired { now, delay_ms: 0 }
        )
    );
    assert_eq!(cancelled.state, JobState::Cancelled);

    // Not running, or unknown: refused, nothing changes.
    let queued = f.enqueue(&spec("queued")).await;
    expect_illegal(
        f.store.job_expire_lease(queued.id).await,
        queued.id,
        JobState::Queued,
        EventKind::LeaseExpired,
    );
    assert_eq!(f.get(queued.id).await, queued);
    expect_not_found(f.store.job_expire_lease(999_999).await, 999_999);
}
