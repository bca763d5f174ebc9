//! Counters of what each worker did, served as JSON on the consumer's
//! `/stats` for the demo's summary and for operators.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::Serialize;

/// How long the handler took, in seconds, once per delivery it handled.
#[derive(Debug, Clone)]
pub struct HandlerSeconds(pub Histogram);

impl Default for HandlerSeconds {
    /// 1 ms up to about 33 s (the handler deadline is 30 s).
    fn default() -> Self {
        Self(Histogram::new(exponential_buckets(0.001, 2.0, 16)))
    }
}

#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Deliveries taken from the work queue.
    pub received: AtomicU64,
    /// Sessions that ended in an error and were opened again.
    pub reconnects: AtomicU64,
    pub handler_seconds: HandlerSeconds,
    pub handled: AtomicU64,
    pub duplicates: AtomicU64,
    /// Messages with nothing left to change (an older version than the one
    /// applied): recorded, acked, no effect.
    pub skipped: AtomicU64,
    pub requeued: AtomicU64,
    retried_per_tier: Vec<(String, AtomicU64)>,
    pub dead_poison: AtomicU64,
    pub dead_permanent: AtomicU64,
    pub dead_exhausted: AtomicU64,
    /// Handler batches run (each one inbox query and at most one commit).
    pub batches: AtomicU64,
    pub largest_batch: AtomicU64,
}

impl WorkerStats {
    pub fn new(retry_queues: &[String]) -> Self {
        Self {
            retried_per_tier: retry_queues
                .iter()
                .map(|q| (q.clone(), AtomicU64::new(0)))
                .collect(),
            ..Self::default()
        }
    }

    pub fn count_retry(&self, tier: usize) {
        if let Some((_, counter)) = self.retried_per_tier.get(tier) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn count_received(&self, n: usize) {
        self.received
            .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// One handler call of `handled` deliveries took `elapsed`: observed once
    /// per delivery, since each of them waited that long.
    pub fn observe_handler(&self, elapsed: std::time::Duration, handled: usize) {
        for _ in 0..handled {
            self.handler_seconds.0.observe(elapsed.as_secs_f64());
        }
    }

    /// Settled deliveries that were acked: handled, absorbed duplicates, and
    /// those whose retry or dead-letter copy was confirmed.
    pub fn acked(&self) -> u64 {
        let snapshot = self.snapshot();
        snapshot.handled
            + snapshot.duplicates
            + snapshot.retried.iter().map(|(_, n)| n).sum::<u64>()
            + snapshot.dead_total()
    }

    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_batch(&self, size: usize) {
        Self::bump(&self.batches);
        self.largest_batch
            .fetch_max(u64::try_from(size).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> WorkerSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerSnapshot {
            handled: get(&self.handled),
            duplicates: get(&self.duplicates),
            skipped: get(&self.skipped),
            requeued: get(&self.requeued),
            retried: self
                .retried_per_tier
                .iter()
                .map(|(queue, c)| (queue.clone(), get(c)))
                .collect(),
            dead_lettered: BTreeMap::from([
                ("poison".to_owned(), get(&self.dead_poison)),
                ("permanent".to_owned(), get(&self.dead_permanent)),
                ("exhausted".to_owned(), get(&self.dead_exhausted)),
            ]),
            batches: get(&self.batches),
            largest_batch: get(&self.largest_batch),
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq, Default)]
pub struct WorkerSnapshot {
    pub handled: u64,
    pub duplicates: u64,
    /// Stale messages: superseded by what was applied already.
    #[serde(default)]
    pub skipped: u64,
    pub requeued: u64,
    /// Copies sent into each delay tier, by queue name, in tier order.
    pub retried: Vec<(String, u64)>,
    pub dead_lettered: BTreeMap<String, u64>,
    /// Handler batches run; `handled` / `batches` is the mean batch size.
    #[serde(default)]
    pub batches: u64,
    #[serde(default)]
    pub largest_batch: u64,
}

impl WorkerSnapshot {
    pub fn dead_total(&self) -> u64 {
        self.dead_lettered.values().sum()
    }
}

/// All workers' counters, by worker name.
#[derive(Debug, Default, Clone)]
pub struct ConsumerStats {
    workers: BTreeMap<String, Arc<WorkerStats>>,
}

impl ConsumerStats {
    pub fn add(&mut self, worker: &str, stats: Arc<WorkerStats>) {
        self.workers.insert(worker.to_owned(), stats);
    }

    pub fn workers(&self) -> impl Iterator<Item = (&String, &Arc<WorkerStats>)> {
        self.workers.iter()
    }

    pub fn snapshot(&self) -> BTreeMap<String, WorkerSnapshot> {
        self.workers
            .iter()
            .map(|(name, stats)| (name.clone(), stats.snapshot()))
            .collect()
    }
}
