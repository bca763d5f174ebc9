//! The run's table: every figure as its median with the spread (min–max)
//! over the repetitions, each beside its ceiling as a ratio; printed, and
//! written into `BENCHMARKS.md` between markers, so the hand-written text
//! around it (the levers and what they did) stays.

use std::{fmt::Write as _, path::Path};

use super::{
    database::Transaction,
    machine::Machine,
    pipeline::{DrainFigures, RunFigures},
    sample::{PercentileSpread, Percentiles, Spread, number},
};

pub const BEGIN: &str =
    "<!-- bench:begin (written by target/release/bench; edits here are overwritten) -->";
pub const END: &str = "<!-- bench:end -->";

/// Everything one bench run measured.
#[derive(Debug, Clone)]
pub struct Results {
    pub command: String,
    pub machine: Machine,
    pub orders: usize,
    pub clients: usize,
    pub repetitions: usize,
    pub broker_messages: usize,
    pub broker: Vec<f64>,
    pub database: Vec<(Transaction, usize, Vec<f64>)>,
    pub pipeline: Vec<RunFigures>,
    /// (fraction of the maximum, target orders/s, runs)
    pub open_loop: Vec<(f64, f64, Vec<RunFigures>)>,
    pub backlog: Vec<DrainFigures>,
    pub peer: Result<Vec<RunFigures>, String>,
    /// Children that did not exit 0 on SIGTERM.
    pub unclean: Vec<String>,
    /// File names of the plots, relative to BENCHMARKS.md.
    pub plots: Vec<(String, String)>,
}

fn throughput(runs: &[RunFigures]) -> Option<Spread> {
    Spread::of(&runs.iter().map(|r| r.orders_per_second).collect::<Vec<_>>())
}

fn latency(runs: &[RunFigures]) -> Option<PercentileSpread> {
    PercentileSpread::of(&runs.iter().map(|r| r.latency).collect::<Vec<_>>())
}

/// The spread of a figure that some runs have (the peer has no relay).
fn spread_of(
    runs: &[RunFigures],
    figure: impl Fn(&RunFigures) -> Option<Percentiles>,
) -> Option<PercentileSpread> {
    PercentileSpread::of(&runs.iter().filter_map(figure).collect::<Vec<_>>())
}

fn relay_latency(runs: &[RunFigures]) -> Option<PercentileSpread> {
    spread_of(runs, |r| r.relay_latency)
}

fn requests(runs: &[RunFigures]) -> Option<PercentileSpread> {
    spread_of(runs, |r| r.requests)
}

fn ms(p: &PercentileSpread) -> String {
    format!(
        "p50 {} · p95 {} · p99 {} · max {}",
        p.p50.display(1),
        p.p95.display(1),
        p.p99.display(1),
        p.max.display(1)
    )
}

/// The processes whose CPU the pipeline's rows show, ours first.
const PROCESSES: [&str; 5] = [
    "producer",
    "consumer",
    "payment-gateway",
    "rabbitmq",
    "postgres",
];

/// The median per run of `f` over a run's groups named `label`.
fn per_group(
    runs: &[RunFigures],
    label: &str,
    f: impl Fn(&RunFigures, &super::procs::GroupCost) -> f64,
) -> Option<Spread> {
    let values: Vec<f64> = runs
        .iter()
        .filter_map(|run| {
            run.costs
                .iter()
                .find(|c| c.label == label)
                .map(|c| f(run, c))
        })
        .collect();
    Spread::of(&values)
}

/// Statements our binaries sent per order, as they count them.
fn statements_per_order(runs: &[RunFigures]) -> Option<Spread> {
    Spread::of(
        &runs
            .iter()
            .filter_map(|r| r.statements.map(|n| n as f64 / r.orders as f64))
            .collect::<Vec<_>>(),
    )
}

/// Orders per batch of the refunds worker: each batch is one commit.
fn refunds_per_commit(runs: &[RunFigures]) -> Option<Spread> {
    Spread::of(
        &runs
            .iter()
            .filter(|r| r.refund_batches > 0)
            .map(|r| r.orders as f64 / r.refund_batches as f64)
            .collect::<Vec<_>>(),
    )
}

/// CPU of every measured process (ours, RabbitMQ, PostgreSQL) per 1,000 orders.
fn total_cpu_per_1000(runs: &[RunFigures]) -> Option<Spread> {
    let total: Vec<f64> = runs
        .iter()
        .map(|run| run.costs.iter().map(|c| cpu_per_1000(run, c)).sum())
        .collect();
    Spread::of(&total)
}

fn cpu_per_1000(run: &RunFigures, cost: &super::procs::GroupCost) -> f64 {
    cost.cpu_seconds * 1000.0 / run.orders as f64
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ratio(a: Option<Spread>, b: Option<Spread>, what: &str) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.median > 0.0 => {
            format!("{:.2}× {what}", a.median / b.median)
        }
        _ => String::new(),
    }
}

fn per_order(runs: &[RunFigures], f: impl Fn(&RunFigures) -> i64) -> Option<Spread> {
    Spread::of(
        &runs
            .iter()
            .map(|r| f(r) as f64 / r.orders as f64)
            .collect::<Vec<_>>(),
    )
}

struct Table(Vec<[String; 3]>);

impl Table {
    fn row(
        &mut self,
        figure: impl Into<String>,
        value: impl Into<String>,
        ceiling: impl Into<String>,
    ) {
        self.0.push([figure.into(), value.into(), ceiling.into()]);
    }

    fn opt(&mut self, figure: &str, value: Option<String>, ceiling: impl Into<String>) {
        self.row(figure, value.unwrap_or_else(|| "n/a".to_owned()), ceiling);
    }
}

impl Results {
    fn best_pair(&self) -> Option<Spread> {
        self.database
            .iter()
            .filter(|(kind, _, _)| *kind == Transaction::Pair)
            .filter_map(|(_, _, values)| Spread::of(values))
            .max_by(|a, b| a.median.total_cmp(&b.median))
    }

    fn table(&self) -> Table {
        let mut t = Table(Vec::new());
        let pipeline = throughput(&self.pipeline);
        let peer_runs: &[RunFigures] = self.peer.as_deref().unwrap_or(&[]);
        let peer = throughput(peer_runs);
        let broker = Spread::of(&self.broker);
        let pair = self.best_pair();

        t.opt(
            &format!(
                "broker limit: one hop, {} msgs, msgs/s",
                number(self.broker_messages as f64, 0)
            ),
            broker.map(|s| s.display(0).to_string()),
            "",
        );
        for (kind, connections, values) in &self.database {
            t.opt(
                &format!(
                    "database limit: {} on {connections} conn, tx/s",
                    kind.label()
                ),
                Spread::of(values).map(|s| s.display(0).to_string()),
                "",
            );
        }
        t.opt(
            &format!(
                "**pipeline: orders/s** ({} orders, {} clients)",
                self.orders, self.clients
            ),
            pipeline.map(|s| format!("**{}**", s.display(0))),
            [
                ratio(pipeline, peer, "Celery"),
                ratio(pipeline, pair, "DB pair limit"),
            ]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" · "),
        );
        t.opt(
            "pipeline: cancel→refund latency, ms (closed loop)",
            latency(&self.pipeline).map(|p| ms(&p)),
            "",
        );
        t.opt(
            "pipeline: of which cancel→published (relay's mark after the confirm), ms",
            relay_latency(&self.pipeline).map(|p| ms(&p)),
            "",
        );
        t.opt(
            "pipeline: cancel request latency, ms",
            requests(&self.pipeline).map(|p| ms(&p)),
            "",
        );
        for label in ["producer", "consumer", "payment-gateway"] {
            t.opt(
                &format!("peak RSS {label}, MiB"),
                per_group(&self.pipeline, label, |_, c| mib(c.peak_rss_kib))
                    .map(|s| s.display(1).to_string()),
                "",
            );
        }
        for label in PROCESSES {
            t.opt(
                &format!("CPU s / 1,000 orders: {label}"),
                per_group(&self.pipeline, label, cpu_per_1000).map(|s| s.display(2).to_string()),
                "",
            );
        }
        t.opt(
            "CPU s / 1,000 orders: all of the above",
            total_cpu_per_1000(&self.pipeline).map(|s| s.display(2).to_string()),
            "",
        );
        t.opt(
            "DB per order: committed transactions (xact_commit)",
            per_order(&self.pipeline, |r| r.counters.xact_commit).map(|s| s.display(2).to_string()),
            ratio(
                per_order(&self.pipeline, |r| r.counters.xact_commit),
                per_order(peer_runs, |r| r.counters.xact_commit),
                "Celery",
            ),
        );
        t.opt(
            "DB per order: statements sent by producer and consumer (BEGIN and COMMIT included)",
            statements_per_order(&self.pipeline).map(|s| s.display(2).to_string()),
            "",
        );
        t.opt(
            "consumer: refunds per commit (mean batch of the refunds worker)",
            refunds_per_commit(&self.pipeline).map(|s| s.display(1).to_string()),
            "",
        );
        t.opt(
            "DB per order: table scans (seq + idx)",
            per_order(&self.pipeline, |r| r.counters.scans).map(|s| s.display(2).to_string()),
            "",
        );
        t.opt(
            "DB per order: rows inserted / updated",
            per_order(&self.pipeline, |r| r.counters.rows_inserted)
                .zip(per_order(&self.pipeline, |r| r.counters.rows_updated))
                .map(|(i, u)| format!("{} / {}", i.display(2), u.display(2))),
            "",
        );
        for (fraction, rate, runs) in &self.open_loop {
            t.opt(
                &format!(
                    "open loop {:.0} % ({} orders/s offered): achieved orders/s",
                    fraction * 100.0,
                    number(*rate, 0)
                ),
                throughput(runs).map(|s| s.display(0).to_string()),
                "",
            );
            t.opt(
                &format!(
                    "open loop {:.0} %: cancel→refund latency, ms",
                    fraction * 100.0
                ),
                latency(runs).map(|p| ms(&p)),
                "",
            );
            t.opt(
                &format!(
                    "open loop {:.0} %: of which cancel→published, ms",
                    fraction * 100.0
                ),
                relay_latency(runs).map(|p| ms(&p)),
                "",
            );
            t.opt(
                &format!(
                    "open loop {:.0} %: cancel request latency, ms",
                    fraction * 100.0
                ),
                requests(runs).map(|p| ms(&p)),
                "",
            );
            // Batches are smaller at a steady rate than in the closed loop,
            // so an order costs more here; this is what the latency pays.
            t.opt(
                &format!(
                    "open loop {:.0} %: CPU s / 1,000 orders, all processes",
                    fraction * 100.0
                ),
                total_cpu_per_1000(runs).map(|s| s.display(2).to_string()),
                "",
            );
            t.opt(
                &format!(
                    "open loop {:.0} %: DB statements per order, refunds per commit",
                    fraction * 100.0
                ),
                statements_per_order(runs)
                    .zip(refunds_per_commit(runs))
                    .map(|(s, r)| format!("{} · {}", s.display(2), r.display(1))),
                "",
            );
            let medians: Option<Vec<String>> = PROCESSES
                .iter()
                .map(|label| {
                    per_group(runs, label, cpu_per_1000)
                        .map(|s| format!("{label} {}", number(s.median, 2)))
                })
                .collect();
            t.opt(
                &format!(
                    "open loop {:.0} %: of which each process (medians)",
                    fraction * 100.0
                ),
                medians.map(|m| m.join(" · ")),
                "",
            );
        }
        if let Some(first) = self.backlog.first() {
            let drain = Spread::of(
                &self
                    .backlog
                    .iter()
                    .map(|d| d.drain_per_second)
                    .collect::<Vec<_>>(),
            );
            t.opt(
                &format!(
                    "backlog of {} orders: drain, refunds/s",
                    number(first.orders as f64, 0)
                ),
                drain.map(|s| s.display(0).to_string()),
                ratio(drain, pipeline, "pipeline"),
            );
            let rss = |f: fn(&DrainFigures) -> u64| {
                Spread::of(&self.backlog.iter().map(|d| mib(f(d))).collect::<Vec<_>>())
            };
            t.opt(
                "backlog: consumer RSS start / peak / end, MiB",
                rss(|d| d.rss_start_kib)
                    .zip(rss(|d| d.rss_peak_kib))
                    .zip(rss(|d| d.rss_end_kib))
                    .map(|((a, b), c)| {
                        format!("{} / {} / {}", a.display(1), b.display(1), c.display(1))
                    }),
                "",
            );
        }
        match &self.peer {
            Ok(runs) => {
                t.opt(
                    "**Celery peer: orders/s**",
                    peer.map(|s| format!("**{}**", s.display(0))),
                    ratio(peer, pair, "DB pair limit"),
                );
                t.opt(
                    "Celery peer: cancel→refund latency, ms",
                    latency(runs).map(|p| ms(&p)),
                    "",
                );
                for label in ["peer api", "peer worker", "peer payment-gateway"] {
                    t.opt(
                        &format!("Celery peer: peak RSS {label} (all its processes), MiB"),
                        per_group(runs, label, |_, c| mib(c.peak_rss_kib))
                            .map(|s| s.display(1).to_string()),
                        "",
                    );
                }
                for label in [
                    "peer api",
                    "peer worker",
                    "peer payment-gateway",
                    "rabbitmq",
                    "postgres",
                ] {
                    t.opt(
                        &format!("Celery peer: CPU s / 1,000 orders: {label}"),
                        per_group(runs, label, cpu_per_1000).map(|s| s.display(2).to_string()),
                        "",
                    );
                }
                t.opt(
                    "Celery peer: DB per order: committed transactions",
                    per_order(runs, |r| r.counters.xact_commit).map(|s| s.display(2).to_string()),
                    "",
                );
            }
            Err(error) => t.row("Celery peer", format!("n/a: {error}"), ""),
        }
        t
    }

    /// The table as Markdown.
    pub fn markdown_table(&self) -> String {
        let mut out =
            String::from("| figure | median (min–max) | beside its ceiling |\n|---|---|---|\n");
        for [figure, value, ceiling] in self.table().0 {
            let _ = writeln!(out, "| {figure} | {value} | {ceiling} |");
        }
        out
    }

    /// The section written into BENCHMARKS.md.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        let _ = writeln!(out, "## Latest run\n");
        let _ = writeln!(out, "```bash\n{}\n```\n", self.command);
        let _ = writeln!(
            out,
            "Machine: {} cores, {} memory, Linux {}; RabbitMQ {}, PostgreSQL {}; {}; commit {}. \
             Load average (1/5/15 min) {} before, {} after. Each figure is the median of {} \
             repetitions with the spread (min–max); the machine is shared with other builds and \
             tests, so compare figures of one run only.\n",
            m.cores,
            m.memory,
            m.kernel,
            m.rabbitmq,
            m.postgres,
            m.rustc,
            m.commit,
            m.load_before,
            m.load_after,
            self.repetitions
        );
        out.push_str(&self.markdown_table());
        let _ = writeln!(
            out,
            "\nHow it is measured: throughput and latency from the database's timestamps, from \
             the cancel (`orders.updated_at`, the time the cancel transaction was given) to the \
             refund's inbox row (`processed_messages.processed_at`, PostgreSQL's `now()` in the \
             refund transaction); \"orders/s\" is the orders over the span from the first cancel to \
             the last refund. CPU from `/proc/<pid>/stat` of each binary, of RabbitMQ's `beam.smp` \
             (the whole broker) and of the PostgreSQL backends serving the run's database, from the \
             first cancel until every refund and notification was settled. Peak RSS is `VmHWM`. \
             DB per order from `pg_stat_database.xact_commit` (every statement outside a \
             transaction counts as one) and the sums of `pg_stat_user_tables`; statements per \
             order from the producer's and the consumer's own count \
             (`courier_database_statements_total` in their `/metrics`, every statement Diesel \
             sent, `BEGIN` and `COMMIT` included), since `pg_stat_statements` is not loaded on \
             this server and loading it needs a restart."
        );
        if !self.plots.is_empty() {
            let _ = writeln!(out);
            for (title, file) in &self.plots {
                let _ = writeln!(out, "- [{title}]({file})");
            }
        }
        if !self.unclean.is_empty() {
            let _ = writeln!(
                out,
                "\nDid not stop cleanly on SIGTERM: {}.",
                self.unclean.join(", ")
            );
        }
        out
    }
}

/// Writes `section` between the markers of `path`, creating the file or
/// appending the markers when they are not there yet.
pub fn write_into(path: &Path, section: &str) -> std::io::Result<()> {
    let block = format!("{BEGIN}\n{section}{END}\n");
    let text = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n\n".to_owned());
    let updated = match (text.find(BEGIN), text.find(END)) {
        (Some(begin), Some(end)) if end > begin => {
            format!(
                "{}{block}{}",
                &text[..begin],
                text[end + END.len()..].trim_start_matches('\n')
            )
        }
        _ => format!("{}\n{block}", text.trim_end()),
    };
    std::fs::write(path, updated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_replaced_and_the_text_around_it_kept() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("courier-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("BENCHMARKS.md");
        std::fs::write(&path, "# Benchmarks\n\nintro\n")?;
        write_into(&path, "first\n")?;
        std::fs::write(
            &path,
            std::fs::read_to_string(&path)? + "\n## Levers\nkept\n",
        )?;
        write_into(&path, "second\n")?;
        let text = std::fs::read_to_string(&path)?;
        assert!(
            text.contains("intro") && text.contains("second") && text.contains("kept"),
            "{text}"
        );
        assert!(!text.contains("first"), "{text}");
        std::fs::remove_dir_all(dir)?;
        Ok(())
    }
}
