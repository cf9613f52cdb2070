//! Contract cases for flow control: a queue's `max_running` bound, held inside the claim on
//! every adapter, under concurrency too.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::Barrier;

use faultline_domain::{JobSpec, JobState};
use faultline_ports::{LeaseRef, QueueLimits};

use super::{Fixture, LEASE_MS, expect_invalid, failure, ids, params, spec};

fn bound(n: i32) -> QueueLimits {
    QueueLimits {
        max_running: Some(n),
    }
}

/// The running jobs of `queue`, from the store's own listing.
async fn running_in(f: &Fixture, queue: &str) -> usize {
    f.all_jobs()
        .await
        .iter()
        .filter(|job| job.queue == queue && job.state == JobState::Running)
        .count()
}

/// `max_running` caps what claims lease from a queue: alone or next to other queues, in claim
/// order across them; a held-back job stays queued with its attempts untouched; every way a job
/// stops running (complete, fail, snooze, rescue, operator expiry) frees its slot; raising,
/// lowering and removing the bound apply to the next claim; pause still wins; bounds are checked.
pub async fn max_running_bounds_the_running_jobs_of_a_queue(f: Fixture) {
    let lim: Vec<_> = {
        let mut jobs = Vec::new();
        for _ in 0..8 {
            jobs.push(f.enqueue(&spec("lim")).await);
        }
        jobs
    };
    let free1 = f.enqueue(&spec("free")).await;
    let free2 = f.enqueue(&spec("free")).await;

    f.advance(1_000);
    let set = f
        .store
        .queue_set_limits("lim", &bound(2))
        .await
        .expect("set");
    assert_eq!(set.max_running, Some(2));
    assert_eq!(set.updated_at, f.now());
    assert!(!set.paused);
    let listed = f.store.queue_list().await.expect("list");
    let row = listed.iter().find(|q| q.name == "lim").expect("lim listed");
    assert_eq!(row, &set);
    assert_eq!(
        listed
            .iter()
            .find(|q| q.name == "free")
            .expect("free")
            .max_running,
        None
    );
    // Setting the same bound again changes nothing.
    f.advance(1_000);
    assert_eq!(
        f.store
            .queue_set_limits("lim", &bound(2))
            .await
            .expect("again"),
        set
    );

    let first = f.claim(&params(&["lim"], 10, LEASE_MS)).await;
    assert_eq!(
        ids(&first),
        [lim[0].id, lim[1].id],
        "two slots, in claim order"
    );
    assert!(f.claim(&params(&["lim"], 10, LEASE_MS)).await.is_empty());
    assert_eq!(
        ids(&f.claim(&params(&["free", "lim"], 10, LEASE_MS)).await),
        [free1.id, free2.id],
        "a full bounded queue yields nothing next to an open one"
    );
    let waiting = f.get(lim[2].id).await;
    assert_eq!(waiting.state, JobState::Queued);
    assert_eq!(waiting.attempts, 0, "held back without spending an attempt");

    // Each way out of `running` frees one slot.
    f.store
        .job_complete(LeaseRef::of(&first[0]), None)
        .await
        .expect("complete");
    let second = f.claim(&params(&["lim"], 10, LEASE_MS)).await;
    assert_eq!(ids(&second), [lim[2].id], "completion freed one slot");
    f.store
        .job_fail(LeaseRef::of(&first[1]), &failure("boom", false, None))
        .await
        .expect("fail");
    let third = f.claim(&params(&["lim"], 10, LEASE_MS)).await;
    assert_eq!(ids(&third), [lim[3].id], "failure freed one slot");
    f.store
        .job_snooze(LeaseRef::of(&second[0]), 60_000)
        .await
        .expect("snooze");
    let fourth = f.claim(&params(&["lim"], 10, LEASE_MS)).await;
    assert_eq!(ids(&fourth), [lim[4].id], "snooze freed one slot");
    f.store.job_expire_lease(third[0].id).await.expect("expire");
    let fifth = f.claim(&params(&["lim"], 10, LEASE_MS)).await;
    assert_eq!(
        ids(&fifth),
        [lim[5].id],
        "an operator's expiry freed one slot"
    );
    assert_eq!(running_in(&f, "lim").await, 2);
    f.advance(LEASE_MS + 1);
    let rescued = f.store.job_rescue_expired(100).await.expect("rescue");
    assert_eq!(
        rescued.iter().filter(|job| job.queue == "lim").count(),
        2,
        "both leases ran out"
    );
    assert_eq!(running_in(&f, "lim").await, 0);

    // Raising the bound: the next claim takes the new room; lowering it stops nothing running.
    f.store
        .queue_set_limits("lim", &bound(3))
        .await
        .expect("raise");
    let raised = f.claim(&params(&["lim"], 10, LEASE_MS)).await;
    assert_eq!(raised.len(), 3, "{:?}", ids(&raised));
    f.store
        .queue_set_limits("lim", &bound(1))
        .await
        .expect("lower");
    assert!(f.claim(&params(&["lim"], 10, LEASE_MS)).await.is_empty());
    assert_eq!(
        running_in(&f, "lim").await,
        3,
        "a lower bound stops nothing"
    );
    for job in &raised[..2] {
        f.store
            .job_complete(LeaseRef::of(job), None)
            .await
            .expect("complete");
    }
    assert!(
        f.claim(&params(&["lim"], 10, LEASE_MS)).await.is_empty(),
        "one still runs: the bound of 1 is taken"
    );
    f.store
        .job_complete(LeaseRef::of(&raised[2]), None)
        .await
        .expect("complete");
    // The rescued jobs are due again after their backoff.
    f.advance(2_000);
    assert_eq!(f.claim(&params(&["lim"], 10, LEASE_MS)).await.len(), 1);

    // Pause wins over room under the bound; removing the bound opens the queue fully.
    f.store.queue_pause("lim").await.expect("pause");
    let open = f
        .store
        .queue_set_limits("lim", &QueueLimits::default())
        .await
        .expect("remove");
    assert_eq!(open.max_running, None);
    assert!(open.paused, "setting limits keeps the pause");
    assert!(f.claim(&params(&["lim"], 10, LEASE_MS)).await.is_empty());
    f.store.queue_resume("lim").await.expect("resume");
    f.advance(60_000);
    let queued_left = f
        .all_jobs()
        .await
        .iter()
        .filter(|job| job.queue == "lim" && job.state == JobState::Queued)
        .filter(|job| job.next_run_at <= f.now())
        .count();
    assert!(queued_left >= 2, "{queued_left}");
    assert_eq!(
        f.claim(&params(&["lim"], 10, LEASE_MS)).await.len(),
        queued_left,
        "no bound: every due job"
    );

    // A queue without a row gets one with its bound; bounds and names are checked.
    let early = f
        .store
        .queue_set_limits("later", &bound(1))
        .await
        .expect("set on a new queue");
    assert_eq!((early.max_running, early.paused), (Some(1), false));
    for bad in [0, -1, QueueLimits::MAX_RUNNING + 1] {
        expect_invalid(
            f.store.queue_set_limits("lim", &bound(bad)).await,
            "an out-of-range bound",
        );
    }
    expect_invalid(
        f.store.queue_set_limits("", &bound(1)).await,
        "an empty queue name",
    );
    let row = f.store.queue_list().await.expect("list");
    assert_eq!(
        row.iter().find(|q| q.name == "lim").map(|q| q.max_running),
        Some(None),
        "refused settings changed nothing"
    );
}

/// A claim over a bounded and an unbounded queue keeps the claim order across both: the bounded
/// queue's better jobs come first, up to its free slots.
pub async fn claims_over_bounded_and_open_queues_keep_the_claim_order(f: Fixture) {
    let urgent = |queue: &str| JobSpec {
        priority: -5,
        ..spec(queue)
    };
    let b1 = f.enqueue(&urgent("bounded")).await;
    let b2 = f.enqueue(&urgent("bounded")).await;
    let b3 = f.enqueue(&urgent("bounded")).await;
    let o1 = f.enqueue(&spec("open")).await;
    let o2 = f.enqueue(&spec("open")).await;
    f.store
        .queue_set_limits("bounded", &bound(2))
        .await
        .expect("set");
    assert_eq!(
        ids(&f.claim(&params(&["open", "bounded"], 1, LEASE_MS)).await),
        [b1.id],
        "the best job overall, from the bounded queue"
    );
    assert_eq!(
        ids(&f.claim(&params(&["open", "bounded"], 10, LEASE_MS)).await),
        [b2.id, o1.id, o2.id],
        "its one free slot, then the open queue"
    );
    assert_eq!(f.get(b3.id).await.state, JobState::Queued);
}

/// Many claims at once on a bounded queue never lease more than its bound in total, round after
/// round (in Postgres each such claim locks the queue's row before it counts).
pub async fn concurrent_claims_never_exceed_max_running(f: Fixture) {
    const BOUND: usize = 7;
    for _ in 0..60 {
        f.enqueue(&spec("race")).await;
    }
    f.store
        .queue_set_limits("race", &bound(BOUND as i32))
        .await
        .expect("set");
    let mut seen = BTreeSet::new();
    for round in 0..4 {
        let start = Arc::new(Barrier::new(12));
        let claims: Vec<_> = (0..12)
            .map(|n| {
                let store = f.store.clone();
                let start = start.clone();
                let mut p = params(&["race"], 5, LEASE_MS);
                p.worker_id = format!("w{n}");
                tokio::spawn(async move {
                    start.wait().await;
                    store.job_claim(&p).await
                })
            })
            .collect();
        let mut leased = Vec::new();
        for claim in claims {
            leased.extend(claim.await.expect("task").expect("claim"));
        }
        assert_eq!(leased.len(), BOUND, "round {round}: {:?}", ids(&leased));
        assert_eq!(running_in(&f, "race").await, BOUND, "round {round}");
        for job in &leased {
            assert!(seen.insert(job.id), "job {} leased twice", job.id);
            f.store
                .job_complete(LeaseRef::of(job), None)
                .await
                .expect("complete");
        }
    }
}
