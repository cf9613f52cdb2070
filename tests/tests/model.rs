//! Model-based tests: random operation sequences against each adapter, compared step by step with
//! a model driven only by `faultline_domain::Job::apply`. `PROPTEST_CASES` overrides the case
//! counts.

use faultline_tests::model;

/// A fresh database per case; 64 cases keep it well under half a minute.
#[test]
fn postgres_store_follows_the_model() {
    model::check(model::postgres(64));
}

/// The in-memory store is cheap: many more cases.
#[test]
fn memory_store_follows_the_model() {
    model::check(model::memory(5_000));
}
