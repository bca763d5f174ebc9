//! Moving committed events from the outbox to the broker.

pub mod backoff;
pub mod relay;
pub mod stats;

pub use relay::{Relay, RelayError, RelayOutcome};
pub use stats::RelayStats;
