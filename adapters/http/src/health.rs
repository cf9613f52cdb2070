//! The health check behind `GET /health`.
//!
//! Design choice: the adapter does not know the database, so the caller hands it a
//! [`HealthCheck`]. [`StoreHealth`] is a ready-made one that asks the store for a job that cannot
//! exist (id 0): one primary-key lookup, answered `NotFound` when the store is up and `Backend`
//! when it is not. A binary with direct access to the pool may implement the trait itself
//! (e.g. `select 1` on `PgStore::pool()`).

use std::sync::Arc;

use faultline_ports::{JobStore, StoreError};

/// Tells whether the database answers. Called for every `GET /health`, bounded by the request
/// timeout (no answer in time counts as down).
#[async_trait::async_trait]
pub trait HealthCheck: Send + Sync + 'static {
    /// `Ok` when the database answers; otherwise a short description of what is down (shown in
    /// the health response, so keep secrets out of it).
    async fn ping(&self) -> Result<(), String>;
}

/// A [`HealthCheck`] through the store port: looks up job id 0, which never exists.
#[derive(Debug, Clone)]
pub struct StoreHealth<S> {
    store: Arc<S>,
}

impl<S: JobStore> StoreHealth<S> {
    /// Checks `store`.
    pub fn new(store: Arc<S>) -> Self {
        StoreHealth { store }
    }
}

#[async_trait::async_trait]
impl<S: JobStore> HealthCheck for StoreHealth<S> {
    async fn ping(&self) -> Result<(), String> {
        match self.store.job_get(0).await {
            Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(StoreError::Backend(source)) => {
                tracing::warn!(error = %source, "health check: storage backend error");
                Err("the database does not answer".to_owned())
            }
            // Any other answer still proves the store is reachable.
            Err(_) => Ok(()),
        }
    }
}
