//! Moving committed events from the outbox to the broker.

pub mod backoff;
pub mod relay;

pub use relay::{Relay, RelayError, RelayOutcome};
