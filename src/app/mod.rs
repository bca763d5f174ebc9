//! `run_until_stopped` for each service: builds the pools and tasks from
//! settings and runs until the injected shutdown future resolves. Binaries
//! are thin wrappers; tests call these directly with their own shutdown.

pub mod consumer;
pub mod producer;
