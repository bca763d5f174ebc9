//! The demo's closing table.

use std::{collections::BTreeMap, fmt};

use crate::consume::stats::WorkerSnapshot;

#[derive(Debug, Clone)]
pub struct DeadLetterSample {
    pub kind: String,
    pub error: String,
    pub count: usize,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub orders: usize,
    pub refunded: i64,
    pub refunds_in_gateway: usize,
    pub notified: i64,
    /// Orders refunded more than once in the gateway's ledger.
    pub doubled: usize,
    /// Canceled orders neither refunded nor dead-lettered.
    pub lost: i64,
    pub pending_outbox: i64,
    pub workers: BTreeMap<String, WorkerSnapshot>,
    pub dead_letter_samples: Vec<DeadLetterSample>,
    pub management_url: String,
    /// Each child and whether it exited 0 after SIGTERM.
    pub clean_exits: Vec<(String, bool)>,
}

impl Summary {
    /// The run's verdict: nothing lost, nothing doubled, nothing stuck.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.doubled == 0 && self.pending_outbox == 0
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f)?;
        writeln!(f, "courier demo summary")?;
        writeln!(f, "  orders canceled                 {:>6}", self.orders)?;
        writeln!(f, "  refunded (our database)         {:>6}", self.refunded)?;
        writeln!(
            f,
            "  refunds in the gateway's ledger {:>6}",
            self.refunds_in_gateway
        )?;
        writeln!(f, "  customers notified              {:>6}", self.notified)?;
        for (worker, stats) in &self.workers {
            writeln!(f, "  [{worker}]")?;
            writeln!(f, "    handled                       {:>6}", stats.handled)?;
            writeln!(
                f,
                "    duplicates absorbed           {:>6}",
                stats.duplicates
            )?;
            for (queue, count) in &stats.retried {
                writeln!(f, "    retried via {queue:<24}{count:>6}")?;
            }
            for (reason, count) in &stats.dead_lettered {
                writeln!(f, "    dead-lettered: {reason:<15}{count:>6}")?;
            }
        }
        if !self.dead_letter_samples.is_empty() {
            writeln!(f, "  why refunds were dead-lettered (refunds.dead):")?;
            for sample in &self.dead_letter_samples {
                writeln!(
                    f,
                    "    {:>4} x {}: {}",
                    sample.count, sample.kind, sample.error
                )?;
            }
        }
        writeln!(f, "  lost                            {:>6}", self.lost)?;
        writeln!(f, "  doubled                         {:>6}", self.doubled)?;
        writeln!(
            f,
            "  still pending in the outbox     {:>6}",
            self.pending_outbox
        )?;
        for (name, clean) in &self.clean_exits {
            writeln!(
                f,
                "  {name:<31} {}",
                if *clean {
                    "stopped cleanly"
                } else {
                    "did NOT stop cleanly"
                }
            )?;
        }
        writeln!(
            f,
            "  verdict                         {}",
            if self.passed() { "PASS" } else { "FAIL" }
        )?;
        writeln!(f)?;
        write!(
            f,
            "Inspect the queues: {} (guest/guest)",
            self.management_url
        )
    }
}
