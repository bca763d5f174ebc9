//! The README's demo: start the gateway simulator, the consumer and the
//! producer as real processes, cancel a batch of orders through the HTTP API,
//! wait until every cancellation is settled, and compare ground truth:
//! canceled orders vs refunds in our database vs the gateway's ledger vs dead
//! letters vs pending outbox rows.

mod children;
mod summary;
mod workload;

pub use children::{Children, child_env};
pub use summary::Summary;
pub use workload::{DemoOptions, consumer_stats, run};
