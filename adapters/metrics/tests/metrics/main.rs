//! faultline-metrics' integration tests: the queue-depth sampler (in memory and on PostgreSQL),
//! the standalone `/metrics` endpoint, and the operator kit in `docs/` (alert rules, scrape
//! config and dashboard) checked with `promtool`.

mod operator_kit;
mod sampler;
mod serve;
