//! Counts the statements this process sends to PostgreSQL: `/metrics`
//! exports the count, and the bench divides it by the orders of a run
//! (statements per order), which `pg_stat_statements` would give only on a
//! server started with that module loaded.
//!
//! Every statement Diesel finishes counts once, whatever its outcome: a
//! query, an `INSERT`, and the `BEGIN` and `COMMIT` around them.

use std::sync::atomic::{AtomicU64, Ordering};

use diesel::connection::{Instrumentation, InstrumentationEvent};

/// The statements of every connection this process opened.
static SENT: AtomicU64 = AtomicU64::new(0);

/// Statements this process has sent so far.
pub fn sent() -> u64 {
    SENT.load(Ordering::Relaxed)
}

/// Counts a connection's statements into `counter`.
#[derive(Debug, Clone, Copy)]
pub struct CountStatements(&'static AtomicU64);

impl CountStatements {
    /// Into the process's count, [`sent`].
    pub fn process_wide() -> Self {
        Self(&SENT)
    }

    /// Into a counter of the caller's (a test's, kept apart from the
    /// statements of everything else in its process).
    pub fn counting_into(counter: &'static AtomicU64) -> Self {
        Self(counter)
    }
}

impl Instrumentation for CountStatements {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::FinishQuery { .. } = event {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}
