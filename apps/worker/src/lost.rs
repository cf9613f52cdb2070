//! Claims whose answer was lost: a claim call that timed out or whose connection broke may still
//! have committed, leasing jobs to this worker that it never received. Each claim call carries a
//! random claim id; after a failed one, the worker asks the store to give back whatever that
//! claim leased (`JobStore::job_release_claim`: queued, due now, attempt returned), again and
//! again until the lease such a claim could have granted has ended (a claim stuck behind a lock
//! may commit long after the worker gave up on it). Jobs of a lost claim therefore never cost an
//! attempt while the store is reachable; if it stays unreachable for the whole lease, the rescuer
//! ends those leases as it would any other.

use std::time::Duration;

use faultline_ports::JobStore;
use tokio::time::Instant;

use crate::backoff::random_u64;
use crate::stats::Counter;
use crate::worker::Worker;

/// How often the worker asks the store to give back a lost claim's jobs.
pub(crate) const RELEASE_EVERY: Duration = Duration::from_millis(500);

/// A claim call whose answer never arrived.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LostClaim {
    pub(crate) claim_id: i64,
    /// After this, any lease the claim granted has ended (the rescuer's business).
    pub(crate) until: Instant,
}

/// A fresh claim id.
pub(crate) fn new_claim_id() -> i64 {
    // Any 63-bit value; collisions between two live claims are beyond unlikely.
    i64::try_from(random_u64() >> 1).unwrap_or(1)
}

impl<S: JobStore> Worker<S> {
    /// Remembers a failed claim call (sent at `sent` with `claim_id`).
    pub(crate) fn claim_lost(&mut self, claim_id: Option<i64>, sent: Instant) {
        if let Some(claim_id) = claim_id {
            self.lost_claims.push(LostClaim {
                claim_id,
                until: sent + self.config.lease,
            });
        }
    }

    /// Claims whose jobs are still being given back.
    pub fn lost_claims(&self) -> usize {
        self.lost_claims.len()
    }

    /// Asks the store once to give back each lost claim's jobs; forgets the claims whose
    /// possible leases have ended. Returns how many jobs came back.
    pub async fn release_lost_claims(&mut self) -> u64 {
        let now = Instant::now();
        let mut released = 0;
        let claims = std::mem::take(&mut self.lost_claims);
        for claim in &claims {
            let result = self
                .call(
                    "release_claim",
                    self.store.job_release_claim(claim.claim_id),
                )
                .await;
            if let Ok(n) = result {
                if n > 0 {
                    tracing::warn!(
                        worker_id = %self.config.worker_id,
                        claim_id = claim.claim_id,
                        jobs = n,
                        "gave back the jobs of a claim whose answer was lost (attempts returned)"
                    );
                }
                released += n;
            }
        }
        self.lost_claims = claims.into_iter().filter(|c| c.until > now).collect();
        self.stats.add(Counter::claims_given_back, released);
        released
    }
}
