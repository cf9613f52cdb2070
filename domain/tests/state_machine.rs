//! Property tests of the job state machine: random event sequences never reach an illegal state.

use chrono::{DateTime, TimeDelta, Utc};
use faultline_domain::{
    AttemptError, Event, EventKind, FailureKind, Job, JobSpec, JobState, TransitionError,
};
use proptest::prelude::*;
use serde_json::json;

fn t0() -> DateTime<Utc> {
    DateTime::UNIX_EPOCH + TimeDelta::days(20_000)
}

/// What a step does, before "now" and the current token are filled in.
#[derive(Debug, Clone)]
enum Step {
    Advance(i64),
    Claim {
        lease_ms: i64,
    },
    /// `stale` presents a token other than the current one.
    Heartbeat {
        stale: bool,
    },
    Complete {
        stale: bool,
    },
    FailRetryable {
        stale: bool,
        delay_ms: i64,
    },
    FailPermanently {
        stale: bool,
    },
    LeaseExpired {
        delay_ms: i64,
    },
    Cancel,
    Redrive,
    Snooze {
        stale: bool,
        delay_ms: i64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0_i64..5_000).prop_map(Step::Advance),
        (1_i64..3_000).prop_map(|lease_ms| Step::Claim { lease_ms }),
        any::<bool>().prop_map(|stale| Step::Heartbeat { stale }),
        any::<bool>().prop_map(|stale| Step::Complete { stale }),
        (any::<bool>(), 0_i64..2_000)
            .prop_map(|(stale, delay_ms)| Step::FailRetryable { stale, delay_ms }),
        any::<bool>().prop_map(|stale| Step::FailPermanently { stale }),
        (0_i64..2_000).prop_map(|delay_ms| Step::LeaseExpired { delay_ms }),
        Just(Step::Cancel),
        Just(Step::Redrive),
        (any::<bool>(), 0_i64..2_000)
            .prop_map(|(stale, delay_ms)| Step::Snooze { stale, delay_ms }),
    ]
}

fn event(step: &Step, job: &Job, now: DateTime<Utc>, stale_token: i64) -> Option<Event> {
    let token = |stale: bool| {
        if stale {
            stale_token
        } else {
            job.fencing_token
        }
    };
    Some(match *step {
        Step::Advance(_) => return None,
        Step::Claim { lease_ms } => Event::Claim {
            owner: "w".into(),
            now,
            lease_ms,
        },
        Step::Heartbeat { stale } => Event::Heartbeat {
            token: token(stale),
            now,
            extend_ms: 1_000,
        },
        Step::Complete { stale } => Event::Complete {
            token: token(stale),
            now,
            result: Some(json!({"ok": true})),
        },
        Step::FailRetryable { stale, delay_ms } => Event::FailRetryable {
            token: token(stale),
            now,
            error: "boom".into(),
            kind: FailureKind::Error,
            delay_ms,
        },
        Step::FailPermanently { stale } => Event::FailPermanently {
            token: token(stale),
            now,
            error: "fatal".into(),
            kind: FailureKind::Error,
        },
        Step::LeaseExpired { delay_ms } => Event::LeaseExpired { now, delay_ms },
        Step::Cancel => Event::Cancel { now },
        Step::Redrive => Event::Redrive { now },
        Step::Snooze { stale, delay_ms } => Event::Snooze {
            token: token(stale),
            now,
            delay_ms,
        },
    })
}

fn new_job(max_attempts: i32) -> Job {
    let spec = JobSpec {
        max_attempts,
        ..JobSpec::new("k", json!({}))
    };
    Job::new(1, &spec, t0())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// The central property: whatever happens, in whatever order, every job stays legal, a
    /// refused event changes nothing, attempts stay within the budget, tokens only grow (by one per
    /// claim), and a stale token never changes anything.
    #[test]
    fn no_sequence_of_events_reaches_an_illegal_state(
        max_attempts in 1_i32..30,
        steps in proptest::collection::vec(step(), 1..120),
    ) {
        let mut job = new_job(max_attempts);
        let mut now = t0();
        for step in &steps {
            if let Step::Advance(ms) = step {
                now += TimeDelta::milliseconds(*ms);
                continue;
            }
            // A stale token: one that belonged to an earlier claim, or was never handed out.
            let stale_token = job.fencing_token - 1;
            let ev = event(step, &job, now, stale_token).expect("not an advance");
            let kind = ev.kind();
            let before = job.clone();
            match job.apply(ev) {
                Ok(()) => {
                    prop_assert!(!matches!(step, Step::Heartbeat { stale: true }
                        | Step::Complete { stale: true }
                        | Step::FailRetryable { stale: true, .. }
                        | Step::FailPermanently { stale: true }
                        | Step::Snooze { stale: true, .. }), "a stale token was accepted: {step:?}");
                    if kind == EventKind::Claim {
                        prop_assert_eq!(job.fencing_token, before.fencing_token + 1);
                        prop_assert_eq!(job.attempts, before.attempts + 1);
                    } else {
                        prop_assert_eq!(job.fencing_token, before.fencing_token);
                    }
                    if before.state == JobState::Succeeded {
                        prop_assert!(false, "succeeded absorbed nothing: {kind} applied");
                    }
                    if before.state.is_terminal() {
                        prop_assert_eq!(kind, EventKind::Redrive, "only a redrive leaves a terminal state");
                    }
                    // Exactly the failed attempts enter the history, bounded, newest last.
                    let failed = matches!(kind, EventKind::FailRetryable
                        | EventKind::FailPermanently | EventKind::LeaseExpired);
                    if failed {
                        let entry = job.errors.last().expect("a failure leaves an entry");
                        prop_assert_eq!(Some(&entry.error), job.last_error.as_ref());
                        prop_assert_eq!(entry.attempt, before.attempts);
                        prop_assert_eq!(entry.fencing_token, before.fencing_token);
                        prop_assert_eq!(entry.at, now);
                        prop_assert_eq!(&entry.worker, &before.lease_owner);
                        prop_assert_eq!(entry.kind == FailureKind::LeaseExpired, kind == EventKind::LeaseExpired);
                        prop_assert_eq!(job.errors.len(), (before.errors.len() + 1).min(AttemptError::HISTORY));
                        prop_assert_eq!(&job.errors[..job.errors.len() - 1], &before.errors[before.errors.len() + 1 - job.errors.len()..]);
                    } else {
                        prop_assert_eq!(&job.errors, &before.errors, "only a failed attempt adds to the history");
                    }
                }
                Err(_) => prop_assert_eq!(&job, &before, "a refused event changed the job"),
            }
            if let Err(broken) = job.check_invariants() {
                prop_assert!(false, "{} after {:?}", broken, step);
            }
            prop_assert!(job.attempts <= job.max_attempts);
        }
    }

    /// A job that kills its worker every time (its lease always expires) ends `failed` after exactly
    /// `max_attempts` claims instead of looping forever.
    #[test]
    fn a_poison_pill_fails_after_max_attempts(max_attempts in 1_i32..30, delay_ms in 0_i64..10_000) {
        let mut job = new_job(max_attempts);
        let mut now = t0();
        let mut claims = 0;
        while job.state != JobState::Failed {
            prop_assert!(claims <= max_attempts, "more claims than the budget");
            now = now.max(job.next_run_at);
            job.apply(Event::Claim { owner: "w".into(), now, lease_ms: 1_000 }).unwrap();
            claims += 1;
            now += TimeDelta::milliseconds(1_000);
            job.apply(Event::LeaseExpired { now, delay_ms }).unwrap();
        }
        prop_assert_eq!(claims, max_attempts);
        prop_assert_eq!(job.attempts, max_attempts);
        prop_assert!(job.last_error.as_deref().unwrap_or("").starts_with("lease expired"));
    }

    /// Snoozing any number of times never uses up the attempt budget.
    #[test]
    fn a_snooze_does_not_use_up_an_attempt(max_attempts in 1_i32..5, snoozes in 1_usize..50) {
        let mut job = new_job(max_attempts);
        let mut now = t0();
        for _ in 0..snoozes {
            now = now.max(job.next_run_at);
            job.apply(Event::Claim { owner: "w".into(), now, lease_ms: 1_000 }).unwrap();
            let token = job.fencing_token;
            job.apply(Event::Snooze { token, now, delay_ms: 10 }).unwrap();
            prop_assert_eq!(job.state, JobState::Queued);
            prop_assert_eq!(job.attempts, 0);
        }
        prop_assert_eq!(job.fencing_token, snoozes as i64);
    }
}

#[test]
fn holder_events_need_the_current_token_and_a_running_job() {
    let mut job = new_job(3);
    let now = t0();
    let err = job
        .apply(Event::Complete {
            token: 0,
            now,
            result: None,
        })
        .unwrap_err();
    assert_eq!(
        err,
        TransitionError::StaleLease {
            presented: 0,
            current: 0,
            state: JobState::Queued
        }
    );
    job.apply(Event::Claim {
        owner: "a".into(),
        now,
        lease_ms: 10,
    })
    .unwrap();
    assert_eq!(job.fencing_token, 1);
    assert_eq!(
        job.lease_expires_at,
        Some(now + TimeDelta::milliseconds(10))
    );
    // The lease ran out and another worker took the job: the first holder is fenced off.
    let later = now + TimeDelta::milliseconds(10);
    job.apply(Event::LeaseExpired {
        now: later,
        delay_ms: 0,
    })
    .unwrap();
    job.apply(Event::Claim {
        owner: "b".into(),
        now: later,
        lease_ms: 10,
    })
    .unwrap();
    let stale = job.apply(Event::Complete {
        token: 1,
        now: later,
        result: None,
    });
    assert!(matches!(
        stale,
        Err(TransitionError::StaleLease {
            presented: 1,
            current: 2,
            ..
        })
    ));
    job.apply(Event::Complete {
        token: 2,
        now: later,
        result: None,
    })
    .unwrap();
    assert_eq!(job.state, JobState::Succeeded);
}

#[test]
fn claims_wait_for_the_due_time_and_expiry_waits_for_the_lease() {
    let mut job = new_job(3);
    job.next_run_at = t0() + TimeDelta::seconds(5);
    let early = Event::Claim {
        owner: "w".into(),
        now: t0(),
        lease_ms: 1_000,
    };
    assert_eq!(job.apply(early), Err(TransitionError::NotDue));
    let due = t0() + TimeDelta::seconds(5);
    job.apply(Event::Claim {
        owner: "w".into(),
        now: due,
        lease_ms: 1_000,
    })
    .unwrap();
    let not_yet = Event::LeaseExpired {
        now: due,
        delay_ms: 0,
    };
    assert_eq!(job.apply(not_yet), Err(TransitionError::LeaseNotExpired));
}

#[test]
fn cancel_of_a_running_job_is_deferred_to_the_end_of_its_attempt() {
    let now = t0();
    // A retryable failure of a job marked for cancellation ends it cancelled, not retried.
    let mut job = new_job(3);
    job.apply(Event::Claim {
        owner: "w".into(),
        now,
        lease_ms: 1_000,
    })
    .unwrap();
    job.apply(Event::Cancel { now }).unwrap();
    assert_eq!((job.state, job.cancel_requested), (JobState::Running, true));
    let token = job.fencing_token;
    job.apply(Event::FailRetryable {
        token,
        now,
        error: "stopped".into(),
        kind: FailureKind::Error,
        delay_ms: 0,
    })
    .unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.finished_at, Some(now));
    // A completion that races the cancel still counts: the work was done.
    let mut job = new_job(3);
    job.apply(Event::Claim {
        owner: "w".into(),
        now,
        lease_ms: 1_000,
    })
    .unwrap();
    job.apply(Event::Cancel { now }).unwrap();
    let token = job.fencing_token;
    job.apply(Event::Complete {
        token,
        now,
        result: None,
    })
    .unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    // Finished jobs cannot be cancelled.
    assert_eq!(
        job.apply(Event::Cancel { now }),
        Err(TransitionError::IllegalTransition {
            from: JobState::Succeeded,
            event: EventKind::Cancel
        })
    );
}

#[test]
fn redrive_gives_a_fresh_budget_and_keeps_the_last_error() {
    let now = t0();
    let mut job = new_job(1);
    job.apply(Event::Claim {
        owner: "w".into(),
        now,
        lease_ms: 1_000,
    })
    .unwrap();
    let token = job.fencing_token;
    job.apply(Event::FailRetryable {
        token,
        now,
        error: "boom".into(),
        kind: FailureKind::Error,
        delay_ms: 0,
    })
    .unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Failed, 1));
    let later = now + TimeDelta::seconds(60);
    job.apply(Event::Redrive { now: later }).unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.attempts, 0);
    assert_eq!(job.next_run_at, later);
    assert_eq!(job.finished_at, None);
    assert_eq!(job.last_error.as_deref(), Some("boom"));
    // The fencing token is never reset: leases from before the redrive stay stale.
    assert_eq!(job.fencing_token, 1);
}
