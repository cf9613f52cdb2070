//! The `JobStore` contract suite, once per adapter: every case is its own test
//! (`postgres::<case>`, `memory::<case>`), so nextest runs each in its own process.

faultline_tests::contract_suite!(postgres, faultline_tests::contract::postgres());
faultline_tests::contract_suite!(memory, faultline_tests::contract::memory());
