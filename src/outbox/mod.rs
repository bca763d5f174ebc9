//! Moving committed events from the outbox to the broker: one relay per
//! publisher, each in its own process, as its own broker user. And the
//! outbox's retention as an event store.

pub mod backoff;
pub mod handoff;
pub mod prune;
pub mod relay;
pub mod stats;
pub mod wake;

pub use handoff::Handoff;
pub use relay::{Relay, RelayError, RelayOutcome};
pub use stats::RelayStats;

use crate::{amqp::envelope::EventEnvelope, store::outbox::OutboxRow};

/// A stored row as the message contract puts it on the wire.
impl<'a> From<&'a OutboxRow> for EventEnvelope<'a> {
    fn from(row: &'a OutboxRow) -> Self {
        Self {
            event_id: row.event_id,
            event_type: &row.event_type,
            event_version: row.event_version,
            aggregate_type: &row.aggregate_type,
            aggregate_id: &row.aggregate_id,
            aggregate_version: row.aggregate_version,
            content_type: &row.content_type,
            occurred_at: row.occurred_at,
            correlation_id: row.correlation_id.as_deref(),
        }
    }
}
