//! Lease requests whose claim answer was lost: a claim call that timed out (the client got 503),
//! failed with a backend error (a broken connection), or was dropped in flight because its client
//! closed the connection (the server then drops the request) may still have committed, leasing
//! jobs to a client that never learns of them. Each claim call carries a random claim id and an
//! [`InFlight`] guard; when the call ends without an answer the client receives, a background task asks the store to give back whatever that claim leased
//! (`JobStore::job_release_claim`: queued, due now, attempt returned) every
//! [`RELEASE_EVERY`] until it did or until the lease the claim asked for would have ended (a claim
//! stuck behind a lock may commit long after the request gave up on it). Such jobs therefore cost
//! no attempt while the store is reachable; if it stays unreachable for the whole lease, the
//! rescue ends those leases as it would any other.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use faultline_ports::JobStore;
use tokio::time::Instant;

/// How often a lost claim's jobs are asked back.
pub(crate) const RELEASE_EVERY: Duration = Duration::from_millis(500);

/// A fresh, random, positive claim id.
pub(crate) fn new_claim_id() -> i64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    // Any 63-bit value but 0; collisions between two live claims are beyond unlikely.
    i64::try_from(hasher.finish() >> 1).unwrap_or(1).max(1)
}

/// A claim call in flight: unless [`InFlight::answered`] is called, dropping it starts giving back
/// whatever the claim leased ([`spawn_release`]), measured from its creation.
pub(crate) struct InFlight {
    lost: Option<Lost>,
}

struct Lost {
    store: Arc<dyn JobStore>,
    claim_id: i64,
    sent: Instant,
    lease: Duration,
    call_timeout: Duration,
    worker_id: String,
}

impl InFlight {
    /// The claim `claim_id` for a lease of `lease` by `worker_id`, sent now.
    pub(crate) fn new(
        store: Arc<dyn JobStore>,
        claim_id: i64,
        lease: Duration,
        call_timeout: Duration,
        worker_id: String,
    ) -> Self {
        InFlight {
            lost: Some(Lost {
                store,
                claim_id,
                sent: Instant::now(),
                lease,
                call_timeout,
                worker_id,
            }),
        }
    }

    /// The claim's answer reached the request: nothing to give back.
    pub(crate) fn answered(&mut self) {
        self.lost = None;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(lost) = self.lost.take() else {
            return;
        };
        // A request dropped by a runtime that is shutting down has nobody left to give back
        // with: its leases end as any other does, by the rescue.
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        spawn_release(lost);
    }
}

/// Starts giving back the jobs of the lost claim `claim_id`, sent at `sent` for a lease of
/// `lease` (the fields of `lost`): one `job_release_claim` now, then every [`RELEASE_EVERY`] until one gave jobs back
/// (a claim commits at most once) or until `sent + lease` has passed. Each call is bounded by
/// `call_timeout`.
fn spawn_release(lost: Lost) {
    let Lost {
        store,
        claim_id,
        sent,
        lease,
        call_timeout,
        worker_id,
    } = lost;
    let until = sent + lease;
    tokio::spawn(async move {
        loop {
            match tokio::time::timeout(call_timeout, store.job_release_claim(claim_id)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(jobs)) => {
                    tracing::warn!(
                        claim_id,
                        jobs,
                        worker_id = %worker_id,
                        "gave back the jobs of a lease request whose answer was lost (attempts \
                         returned)"
                    );
                    return;
                }
                Ok(Err(error)) => {
                    tracing::debug!(claim_id, %error, "giving back a lost claim failed; retrying");
                }
                Err(_) => {
                    tracing::debug!(claim_id, "giving back a lost claim timed out; retrying");
                }
            }
            if Instant::now() >= until {
                return;
            }
            tokio::time::sleep(RELEASE_EVERY).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_ids_are_positive_and_distinct() {
        let ids: std::collections::BTreeSet<i64> = (0..1_000).map(|_| new_claim_id()).collect();
        assert_eq!(ids.len(), 1_000);
        assert!(ids.iter().all(|id| *id > 0));
    }
}
