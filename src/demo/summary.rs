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
    /// Refunds the gateway made for no canceled order.
    pub without_cancel: usize,
    /// Canceled orders neither refunded nor dead-lettered.
    pub lost: i64,
    pub pending_outbox: i64,
    /// The canceled orders by refund status (`refunded`, `refund_failed`,
    /// `none`), as the order service shows them.
    pub refund_statuses: BTreeMap<String, usize>,
    /// Canceled orders whose refund status is missing or disagrees with
    /// their refund (the broker's delivery-limit shelving aside).
    pub without_status: usize,
    pub workers: BTreeMap<String, WorkerSnapshot>,
    /// This run's refund dead letters, grouped by reason.
    pub dead_letter_samples: Vec<DeadLetterSample>,
    /// Letters earlier runs left in `refunds.dead`, kept for analysis and replay.
    pub earlier_dead_letters: usize,
    pub management_url: String,
    /// Who to log in to the management UI as.
    pub operator_user: String,
    /// Each child and whether it exited 0 after SIGTERM.
    pub clean_exits: Vec<(String, bool)>,
}

impl Summary {
    /// The run's verdict: nothing lost, nothing doubled, nothing stuck, and
    /// every canceled order shows what became of its refund.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.doubled == 0
            && self.without_cancel == 0
            && self.pending_outbox == 0
            && self.without_status == 0
    }
}

/// One line of the table: its label (indent included) and its value.
type Row = (String, String);

impl Summary {
    /// The table's lines above the dead-letter samples, then those below.
    /// Labels vary with queue names from config, so the value column is
    /// placed after the longest label rather than at a fixed width.
    fn rows(&self) -> (Vec<Row>, Vec<Row>) {
        let mut counts = vec![
            ("  orders canceled".into(), self.orders.to_string()),
            (
                "  refunded (our database)".into(),
                self.refunded.to_string(),
            ),
            (
                "  refunds in the gateway's ledger".into(),
                self.refunds_in_gateway.to_string(),
            ),
            ("  customers notified".into(), self.notified.to_string()),
            ("  refund status on the orders".into(), String::new()),
        ];
        for (status, count) in &self.refund_statuses {
            counts.push((format!("    {status}"), count.to_string()));
        }
        for (worker, stats) in &self.workers {
            counts.push((format!("  [{worker}]"), String::new()));
            counts.push(("    handled".into(), stats.handled.to_string()));
            counts.push((
                "    duplicates absorbed".into(),
                stats.duplicates.to_string(),
            ));
            if stats.skipped > 0 {
                counts.push(("    skipped as stale".into(), stats.skipped.to_string()));
            }
            for (queue, count) in &stats.retried {
                counts.push((format!("    retried via {queue}"), count.to_string()));
            }
            for (reason, count) in &stats.dead_lettered {
                counts.push((format!("    dead-lettered: {reason}"), count.to_string()));
            }
        }
        let mut verdict = vec![
            ("  lost".into(), self.lost.to_string()),
            ("  doubled".into(), self.doubled.to_string()),
            (
                "  refunded for no canceled order".into(),
                self.without_cancel.to_string(),
            ),
            (
                "  still pending in the outbox".into(),
                self.pending_outbox.to_string(),
            ),
            (
                "  canceled orders without a refund status".into(),
                self.without_status.to_string(),
            ),
        ];
        for (name, clean) in &self.clean_exits {
            let how = if *clean {
                "stopped cleanly"
            } else {
                "did NOT stop cleanly"
            };
            verdict.push((format!("  {name}"), how.into()));
        }
        let passed = if self.passed() { "PASS" } else { "FAIL" };
        verdict.push(("  verdict".into(), passed.into()));
        (counts, verdict)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (counts, verdict) = self.rows();
        let width = counts
            .iter()
            .chain(&verdict)
            .map(|(label, _)| label.chars().count())
            .max()
            .unwrap_or(0);
        let write_rows = |f: &mut fmt::Formatter<'_>, rows: &[Row]| -> fmt::Result {
            for (label, value) in rows {
                if value.is_empty() {
                    writeln!(f, "{label}")?;
                } else {
                    writeln!(f, "{label:<width$} {value:>6}")?;
                }
            }
            Ok(())
        };
        writeln!(f)?;
        writeln!(f, "courier demo summary")?;
        write_rows(f, &counts)?;
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
        if self.earlier_dead_letters > 0 {
            writeln!(
                f,
                "  (refunds.dead also holds {} letter(s) from earlier runs, kept for analysis and replay)",
                self.earlier_dead_letters
            )?;
        }
        write_rows(f, &verdict)?;
        writeln!(f)?;
        write!(
            f,
            "Inspect the queues: {} (log in as {}, password amqp.operator.password)",
            self.management_url, self.operator_user
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary_with_a_long_queue_name() -> Summary {
        let worker = WorkerSnapshot {
            handled: 3,
            retried: vec![("notifications.retry.1s".into(), 2)],
            dead_lettered: BTreeMap::from([("permanent".into(), 1)]),
            ..WorkerSnapshot::default()
        };
        Summary {
            orders: 1000,
            refunded: 996,
            refunds_in_gateway: 996,
            notified: 1000,
            doubled: 0,
            without_cancel: 0,
            lost: 0,
            pending_outbox: 0,
            refund_statuses: BTreeMap::from([
                ("refund_failed".into(), 4),
                ("refunded".into(), 996),
            ]),
            without_status: 0,
            workers: BTreeMap::from([("notifications".into(), worker)]),
            dead_letter_samples: Vec::new(),
            earlier_dead_letters: 0,
            management_url: "http://127.0.0.1:15672".into(),
            operator_user: "courier-operator".into(),
            clean_exits: vec![("payment-gateway".into(), true)],
        }
    }

    #[test]
    fn every_summary_value_ends_in_one_column() {
        let text = summary_with_a_long_queue_name().to_string();
        let ends: Vec<usize> = text
            .lines()
            // A value is set apart from its label by spaces; a heading has none.
            .filter(|line| line.starts_with("  ") && line.trim().contains("  "))
            .filter(|line| !line.contains("stopped") && !line.contains("verdict"))
            .map(|line| line.trim_end().chars().count())
            .collect();
        assert!(ends.len() > 8, "{text}");
        assert!(ends.iter().all(|e| *e == ends[0]), "{text}");
        assert!(
            text.contains("retried via notifications.retry.1s"),
            "{text}"
        );
    }
}
