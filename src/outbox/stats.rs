//! Counters of what the relay did, read by the producer's `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::amqp::PublishError;

#[derive(Debug, Default)]
pub struct RelayStats {
    /// Messages handed to the broker (publish frames sent).
    pub published: AtomicU64,
    /// Of the rows the relay took, those its process's writers handed over
    /// (`Handoff`); the rest were claimed by a query.
    pub handed: AtomicU64,
    /// Acked without a return: the rows marked published.
    pub confirmed: AtomicU64,
    pub nacked: AtomicU64,
    pub returned: AtomicU64,
    /// No answer in time, or the channel broke before it came.
    pub unconfirmed: AtomicU64,
    /// Publisher channels opened; every one after the first is a reconnect.
    pub channel_opens: AtomicU64,
}

impl RelayStats {
    pub fn count_published(&self, n: usize) {
        add(&self.published, n);
    }

    pub fn count_handed(&self, n: usize) {
        add(&self.handed, n);
    }

    /// Counts one publish's answer.
    pub fn record(&self, result: &Result<(), PublishError>) {
        let counter = match result {
            Ok(()) => &self.confirmed,
            Err(PublishError::Nacked) => &self.nacked,
            Err(PublishError::Returned { .. }) => &self.returned,
            Err(PublishError::Timeout(_) | PublishError::Channel(_)) => &self.unconfirmed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_channel_open(&self) {
        self.channel_opens.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reconnects(&self) -> u64 {
        self.channel_opens.load(Ordering::Relaxed).saturating_sub(1)
    }
}

fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
}
