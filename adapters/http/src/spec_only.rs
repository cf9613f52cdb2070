//! A store that is never called: it lets [`crate::openapi_json`] build the OpenAPI document
//! without a database (the document depends only on types, but poem-openapi wants API values).

use faultline_ports::domain::{Job, JobSpec};
use faultline_ports::{
    ClaimParams, ElectParams, EnqueueOutcome, Enqueued, FailOutcome, Failure, HeartbeatOutcome,
    JobPage, JobStore, Leadership, LeaseRef, ListParams, ProcessInfo, ProcessSpec, PruneParams,
    QueueBacklog, QueueInfo, QueueLimits, QueueStats, StoreError, StoreResult, WriteOutcome,
};
use serde_json::Value;

/// Answers every call with a backend error.
pub(crate) struct SpecOnlyStore;

fn absent<T>() -> StoreResult<T> {
    Err(StoreError::Backend(
        "no store: this API instance only serves its OpenAPI document".into(),
    ))
}

#[async_trait::async_trait]
impl JobStore for SpecOnlyStore {
    async fn job_enqueue(&self, _: &JobSpec) -> StoreResult<Enqueued> {
        absent()
    }
    async fn job_enqueue_many(&self, _: &[JobSpec]) -> StoreResult<Vec<EnqueueOutcome>> {
        absent()
    }
    async fn job_claim(&self, _: &ClaimParams) -> StoreResult<Vec<Job>> {
        absent()
    }
    async fn job_release_claim(&self, _: i64) -> StoreResult<u64> {
        absent()
    }
    async fn job_heartbeat_many(
        &self,
        _: &[LeaseRef],
        _: i64,
    ) -> StoreResult<Vec<HeartbeatOutcome>> {
        absent()
    }
    async fn job_complete(&self, _: LeaseRef, _: Option<Value>) -> StoreResult<Job> {
        absent()
    }
    async fn job_complete_many(
        &self,
        _: &[(LeaseRef, Option<Value>)],
    ) -> StoreResult<Vec<WriteOutcome>> {
        absent()
    }
    async fn job_fail(&self, _: LeaseRef, _: &Failure) -> StoreResult<Job> {
        absent()
    }
    async fn job_snooze(&self, _: LeaseRef, _: i64) -> StoreResult<Job> {
        absent()
    }
    async fn job_cancel(&self, _: i64) -> StoreResult<Job> {
        absent()
    }
    async fn job_redrive(&self, _: i64) -> StoreResult<Job> {
        absent()
    }
    async fn job_expire_lease(&self, _: i64) -> StoreResult<Job> {
        absent()
    }
    async fn job_rescue_expired(&self, _: u32) -> StoreResult<Vec<Job>> {
        absent()
    }
    async fn job_get(&self, _: i64) -> StoreResult<Job> {
        absent()
    }
    async fn job_list(&self, _: &ListParams) -> StoreResult<JobPage> {
        absent()
    }
    async fn queue_stats(&self) -> StoreResult<Vec<QueueStats>> {
        absent()
    }
    async fn queue_backlog(&self) -> StoreResult<Vec<QueueBacklog>> {
        absent()
    }
    async fn job_prune(&self, _: &PruneParams) -> StoreResult<u64> {
        absent()
    }
    async fn job_fail_many(&self, _: &[(LeaseRef, Failure)]) -> StoreResult<Vec<FailOutcome>> {
        absent()
    }
    async fn queue_list(&self) -> StoreResult<Vec<QueueInfo>> {
        absent()
    }
    async fn queue_pause(&self, _: &str) -> StoreResult<QueueInfo> {
        absent()
    }
    async fn queue_resume(&self, _: &str) -> StoreResult<QueueInfo> {
        absent()
    }
    async fn queue_set_limits(&self, _: &str, _: &QueueLimits) -> StoreResult<QueueInfo> {
        absent()
    }
    async fn leader_elect(&self, _: &ElectParams) -> StoreResult<Leadership> {
        absent()
    }
    async fn leader_resign(&self, _: &str, _: i64) -> StoreResult<bool> {
        absent()
    }
    async fn leader_get(&self) -> StoreResult<Option<Leadership>> {
        absent()
    }
    async fn process_register(&self, _: &ProcessSpec) -> StoreResult<ProcessInfo> {
        absent()
    }
    async fn process_remove(&self, _: &str) -> StoreResult<bool> {
        absent()
    }
    async fn process_list(&self) -> StoreResult<Vec<ProcessInfo>> {
        absent()
    }
    async fn process_prune(&self, _: i64) -> StoreResult<u64> {
        absent()
    }
}
