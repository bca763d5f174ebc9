//! How a relay learns that its process just committed outbox rows: a
//! process-wide counter per publisher that every writer bumps after its
//! commit and every relay of that publisher watches.
//!
//! It replaces `LISTEN`/`NOTIFY`. A transaction that sends a `NOTIFY` takes
//! one cluster-wide lock at commit and holds it through its WAL flush, so
//! every commit that wrote an outbox row queued behind the previous one:
//! under load, `COMMIT` waiting on that lock was PostgreSQL's most common wait
//! (BENCHMARKS.md). Each outbox row is written by the process whose relay
//! publishes it (the order service's by the producer, the refund context's by
//! the consumer), so an in-process signal reaches the relay that matters.
//! Rows no running relay heard of (written by another process, or left by a
//! crash) are found by the relay's poll (`relay.poll_interval`).
//!
//! A `watch` channel, not a `Notify`: a signal sent while a relay is busy
//! stays marked as unseen, so its next wait returns at once; and every relay
//! of the publisher in the process sees it (the test suite runs many).

use std::sync::LazyLock;

use tokio::sync::watch;

use crate::domain::Publisher;

static WRITTEN: LazyLock<[watch::Sender<u64>; 2]> =
    LazyLock::new(|| [watch::Sender::new(0), watch::Sender::new(0)]);

fn sender(publisher: Publisher) -> &'static watch::Sender<u64> {
    match publisher {
        Publisher::Orders => &WRITTEN[0],
        Publisher::Refunds => &WRITTEN[1],
    }
}

/// Says that rows of `publisher` were committed. Call it after the commit:
/// a relay woken before it would not see them yet.
pub fn rows_committed(publisher: Publisher) {
    sender(publisher).send_modify(|count| *count = count.wrapping_add(1));
}

/// What a relay of `publisher` waits on; signals sent before this call are
/// already seen.
pub fn subscribe(publisher: Publisher) -> watch::Receiver<u64> {
    sender(publisher).subscribe()
}
