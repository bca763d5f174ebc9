//! `courier outbox prune`: the retention of the outbox as an event store.
//!
//! The rule: only events that were published (the broker has them) longer
//! ago than `--older-than` are removed, oldest first, each publisher's as a
//! prefix of its stream, in batches of one transaction each (so a large
//! backlog never holds one long transaction or lock). Events not yet
//! published are never removed. A pull reader that keeps its own offset is
//! never silently skipped past what was removed: the event API answers 410
//! Gone to a reader behind the pruned part, naming where it ends. Keep events
//! at least as long as the slowest reader may be away.

use std::time::Duration;

use chrono::Utc;
use diesel_async::AsyncPgConnection;

use crate::{
    domain::Publisher,
    store::event_store::{self, StreamPosition},
};

/// What a prune removed, per publisher.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Publisher, rows removed, and the new end of its pruned part (if any).
    pub publishers: Vec<(Publisher, usize, Option<StreamPosition>)>,
}

impl PruneReport {
    pub fn total(&self) -> usize {
        self.publishers.iter().map(|(_, rows, _)| rows).sum()
    }
}

/// Removes every event published more than `older_than` ago, `batch` rows
/// per transaction, publisher by publisher.
pub async fn prune(
    conn: &mut AsyncPgConnection,
    older_than: Duration,
    batch: i64,
) -> anyhow::Result<PruneReport> {
    let cutoff = Utc::now() - chrono::Duration::from_std(older_than)?;
    let mut report = PruneReport::default();
    for publisher in Publisher::ALL {
        let (mut rows, mut through) = (0, None);
        while let Some(pruned) =
            event_store::prune_batch(conn, publisher, cutoff, batch.max(1)).await?
        {
            rows += pruned.rows;
            through = Some(pruned.through);
            tracing::info!(publisher = publisher.as_str(), rows = pruned.rows, through = %pruned.through, "pruned a batch");
        }
        report.publishers.push((publisher, rows, through));
    }
    Ok(report)
}
