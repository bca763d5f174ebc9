//! The benchmark of issue 7, measured in one run on the machine's real
//! RabbitMQ and PostgreSQL, each in a vhost and a database of its own:
//! the broker's ceiling for one hop ([`broker`]), the database's ceiling for
//! our two transactions ([`database`]), the whole pipeline through the real
//! binaries closed-loop, open-loop and draining a backlog ([`pipeline`]),
//! and a Celery pipeline doing the same job ([`services::Peer`]). Every
//! figure is the median of several repetitions with its spread; the table
//! goes to stdout and into `BENCHMARKS.md`, the pictures next to it.
//!
//! Speed is measured here and asserted nowhere.

pub mod broker;
pub mod database;
pub mod env;
pub mod load;
pub mod machine;
pub mod pipeline;
pub mod plot;
pub mod procs;
pub mod report;
pub mod sample;
pub mod services;
pub mod timings;

use std::path::PathBuf;

use self::{
    database::Transaction,
    env::{BenchEnv, Management},
    pipeline::{Arrivals, Progress, RunFigures, Target},
    procs::Group,
    report::Results,
    sample::Spread,
    services::{Courier, Peer},
};
use crate::{config::Settings, store};

/// What to run, and how big.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Orders per pipeline run (courier and the peer).
    pub orders: usize,
    /// Concurrent HTTP clients canceling.
    pub clients: usize,
    pub repetitions: usize,
    pub broker_messages: usize,
    /// Transactions per database-limit run.
    pub db_ops: usize,
    /// Connection counts of the database-limit runs.
    pub db_connections: Vec<usize>,
    /// How long each open-loop run offers its rate.
    pub open_loop_seconds: f64,
    pub open_loop_fractions: Vec<f64>,
    /// Open-loop rates in orders/s, offered instead of the fractions (to
    /// compare two builds at the same load).
    pub open_loop_rates: Vec<f64>,
    /// Orders canceled while the consumer is stopped (0: no backlog phase).
    pub backlog: usize,
    pub skip_peer: bool,
    pub bin_dir: PathBuf,
    pub log_dir: PathBuf,
    pub peer_dir: PathBuf,
    pub venv: PathBuf,
    /// Where `BENCHMARKS.md` is written (the plots go to `<out_dir>/bench/`).
    pub out_dir: PathBuf,
    /// Where every courier pipeline run's per-order timings go as CSV
    /// ([`timings`]); none: not written.
    pub timings_dir: Option<PathBuf>,
    /// The repository, for the commit.
    pub repo: PathBuf,
    pub management: Management,
    /// The command line, as the report shows it.
    pub command: String,
    pub show_progress: bool,
}

impl BenchOptions {
    fn say(&self, what: impl AsRef<str>) {
        if self.show_progress {
            eprintln!("bench: {}", what.as_ref());
        }
    }
}

/// Runs everything, writes `BENCHMARKS.md` and the plots, returns the results.
pub async fn run(settings: &Settings, options: &BenchOptions) -> anyhow::Result<Results> {
    let mut results = Results {
        command: options.command.clone(),
        machine: machine::Machine::here(&options.repo),
        orders: options.orders,
        clients: options.clients,
        repetitions: options.repetitions,
        broker_messages: options.broker_messages,
        broker: Vec::new(),
        database: Vec::new(),
        pipeline: Vec::new(),
        open_loop: Vec::new(),
        backlog: Vec::new(),
        peer: Err("not run (--no-peer)".to_owned()),
        unclean: Vec::new(),
        plots: Vec::new(),
    };
    let (rabbitmq, beam) = options.management.broker().await?;
    results.machine.rabbitmq = rabbitmq;
    let mut admin = store::connect(&settings.database.url_for("postgres")).await?;
    results.machine.postgres = store::metrics::server_version(&mut admin).await?;
    drop(admin);

    let courier_env = BenchEnv::create(settings, &options.management, "courier").await?;
    let outcome = courier_phases(&courier_env, beam, options, &mut results).await;
    courier_env.drop_all().await;
    outcome?;

    if !options.skip_peer {
        results.peer = peer_phase(settings, beam, options)
            .await
            .map_err(|e| format!("{e:#}"));
        if let Err(error) = &results.peer {
            options.say(format!("the Celery peer failed: {error}"));
        }
    }
    results.machine.load_after = machine::load_average();
    draw(options, &mut results);
    std::fs::create_dir_all(&options.out_dir)?;
    report::write_into(&options.out_dir.join("BENCHMARKS.md"), &results.markdown())?;
    Ok(results)
}

fn shared_groups(beam: Option<i32>, database: &str) -> Vec<Group> {
    let mut groups = Vec::new();
    if let Some(pid) = beam {
        groups.push(Group::Process {
            label: "rabbitmq".to_owned(),
            pid,
            tree: false,
        });
    }
    groups.push(Group::Postgres {
        label: "postgres".to_owned(),
        database: database.to_owned(),
    });
    groups
}

async fn courier_phases(
    env: &BenchEnv,
    beam: Option<i32>,
    options: &BenchOptions,
    results: &mut Results,
) -> anyhow::Result<()> {
    let reps = options.repetitions.max(1);
    let load = broker::BrokerLoad {
        messages: options.broker_messages,
        confirm_window: 256,
        prefetch: 256,
        ack_every: 64,
    };
    for rep in (0..reps).take_while(|_| options.broker_messages > 0) {
        options.say(format!("broker limit {}/{reps}", rep + 1));
        results
            .broker
            .push(broker::one_hop(&env.amqp_uri(), "bench.broker-limit", load).await?);
    }

    let db = store::pool(&env.settings.database)?;
    let url = env.settings.database.url();
    for kind in [Transaction::Cancel, Transaction::Refund, Transaction::Pair] {
        for &connections in &options.db_connections {
            let mut values = Vec::new();
            for rep in 0..reps {
                options.say(format!(
                    "database limit: {} on {connections} conn {}/{reps}",
                    kind.label(),
                    rep + 1
                ));
                let orders = if kind.needs_orders() {
                    load::place_orders(&db, options.db_ops, 16).await?
                } else {
                    Vec::new()
                };
                values.push(database::run(&url, kind, connections, options.db_ops, orders).await?);
            }
            results.database.push((kind, connections, values));
        }
    }

    // The ceilings' transactions wrote their outbox rows as the real ones do,
    // and nobody is to publish them: the pipeline's relay would otherwise
    // start by relaying thousands of cancels the ceilings already measured,
    // and the consumer's refunds of those would be counted as the run's.
    retire_ceiling_events(&db).await?;
    options.say("starting producer, consumer and payment-gateway");
    let mut courier = Courier::start(env, &options.bin_dir, &options.log_dir).await?;
    let outcome = pipeline_phases(&mut courier, env, &db, beam, options, results).await;
    results.unclean.extend(courier.stop().await);
    outcome
}

async fn retire_ceiling_events(db: &store::DbPool) -> anyhow::Result<()> {
    use diesel_async::RunQueryDsl;
    let mut conn = db.get().await?;
    diesel::sql_query("UPDATE outbox SET published_at = now() WHERE published_at IS NULL")
        .execute(&mut conn)
        .await?;
    Ok(())
}

async fn pipeline_phases(
    courier: &mut Courier,
    env: &BenchEnv,
    db: &store::DbPool,
    beam: Option<i32>,
    options: &BenchOptions,
    results: &mut Results,
) -> anyhow::Result<()> {
    let reps = options.repetitions.max(1);
    let admin_url = env.settings.database.url_for("postgres");
    {
        let mut groups = courier.groups();
        groups.extend(shared_groups(beam, &env.name));
        let target = Target {
            api_url: courier.api_url.clone(),
            db: db.clone(),
            database_url: env.settings.database.url(),
            admin_url: admin_url.clone(),
            groups,
            progress: Progress::Courier(courier),
        };
        options.say("pipeline warm-up");
        let warm = (options.orders / 10).clamp(20, 500);
        pipeline::run(
            &target,
            warm,
            Arrivals::Closed {
                clients: options.clients,
            },
        )
        .await?;
        for rep in 0..reps {
            options.say(format!(
                "pipeline {}/{reps}: {} orders",
                rep + 1,
                options.orders
            ));
            let run = pipeline::run(
                &target,
                options.orders,
                Arrivals::Closed {
                    clients: options.clients,
                },
            )
            .await?;
            options.say(format!(
                "  {:.0} orders/s, p99 {:.1} ms",
                run.orders_per_second, run.latency.p99
            ));
            keep_timings(options, &format!("closed-loop-{}", rep + 1), &run);
            results.pipeline.push(run);
        }
        let max = Spread::of(
            &results
                .pipeline
                .iter()
                .map(|r| r.orders_per_second)
                .collect::<Vec<_>>(),
        )
        .map_or(0.0, |s| s.median);
        let offered: Vec<(f64, f64)> = if options.open_loop_rates.is_empty() {
            options
                .open_loop_fractions
                .iter()
                .map(|&fraction| (fraction, max * fraction))
                .collect()
        } else {
            options
                .open_loop_rates
                .iter()
                .map(|&rate| (rate / max, rate))
                .collect()
        };
        for (fraction, rate) in offered {
            let count = ((rate * options.open_loop_seconds) as usize).max(20);
            let mut runs = Vec::new();
            for rep in 0..reps {
                options.say(format!(
                    "open loop {:.0} % = {rate:.0}/s {}/{reps}: {count} orders",
                    fraction * 100.0,
                    rep + 1
                ));
                let run =
                    pipeline::run(&target, count, Arrivals::Open { per_second: rate }).await?;
                keep_timings(options, &format!("open-loop-{rate:.0}-{}", rep + 1), &run);
                runs.push(run);
            }
            results.open_loop.push((fraction, rate, runs));
        }
    }
    if options.backlog > 0 {
        for rep in 0..reps {
            options.say(format!(
                "backlog {}/{reps}: {} orders",
                rep + 1,
                options.backlog
            ));
            results.backlog.push(
                pipeline::backlog(courier, db, &admin_url, options.backlog, options.clients)
                    .await?,
            );
        }
    }
    Ok(())
}

/// Writes a run's timings where `--timings-dir` asks; a file that cannot be
/// written is reported and the run goes on, as a failed plot is.
fn keep_timings(options: &BenchOptions, name: &str, run: &RunFigures) {
    let Some(dir) = &options.timings_dir else {
        return;
    };
    match timings::write_csv(dir, name, &run.timings) {
        Ok(path) => options.say(format!("  timings: {}", path.display())),
        Err(error) => eprintln!("bench: cannot write the timings of {name}: {error}"),
    }
}

async fn peer_phase(
    settings: &Settings,
    beam: Option<i32>,
    options: &BenchOptions,
) -> anyhow::Result<Vec<RunFigures>> {
    options.say("installing the Celery peer's virtualenv (once)");
    services::ensure_venv(&options.venv, &options.peer_dir.join("requirements.txt")).await?;
    let env = BenchEnv::create(settings, &options.management, "peer").await?;
    let outcome = async {
        options.say("starting the Celery peer");
        let peer = Peer::start(
            &env,
            &options.bin_dir,
            &options.peer_dir,
            &options.venv,
            &options.log_dir,
        )
        .await?;
        let runs = async {
            let db = store::pool(&env.settings.database)?;
            let mut groups = peer.groups();
            groups.extend(shared_groups(beam, &env.name));
            let target = Target {
                api_url: peer.api_url.clone(),
                db,
                database_url: env.settings.database.url(),
                admin_url: env.settings.database.url_for("postgres"),
                groups,
                progress: Progress::RefundRows,
            };
            let warm = (options.orders / 10).clamp(20, 500);
            pipeline::run(
                &target,
                warm,
                Arrivals::Closed {
                    clients: options.clients,
                },
            )
            .await?;
            let reps = options.repetitions.max(1);
            let mut runs = Vec::new();
            for rep in 0..reps {
                options.say(format!(
                    "Celery peer {}/{reps}: {} orders",
                    rep + 1,
                    options.orders
                ));
                let run = pipeline::run(
                    &target,
                    options.orders,
                    Arrivals::Closed {
                        clients: options.clients,
                    },
                )
                .await?;
                options.say(format!(
                    "  {:.0} orders/s, p99 {:.1} ms",
                    run.orders_per_second, run.latency.p99
                ));
                runs.push(run);
            }
            anyhow::Ok(runs)
        }
        .await;
        peer.stop().await;
        runs
    }
    .await;
    env.drop_all().await;
    outcome
}

/// Draws the plots next to BENCHMARKS.md; a drawing that fails is reported
/// and left out, it does not fail the run.
fn draw(options: &BenchOptions, results: &mut Results) {
    let dir = options.out_dir.join("bench");
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let mut by_rate: Vec<&RunFigures> = results.pipeline.iter().collect();
    by_rate.sort_by(|a, b| a.orders_per_second.total_cmp(&b.orders_per_second));
    if let Some(median) = by_rate.get(by_rate.len() / 2) {
        let file = "latency-histogram.svg";
        let title = format!(
            "courier: cancel → refund latency, {} orders, {} clients ({:.0} orders/s)",
            median.orders, results.clients, median.orders_per_second
        );
        match plot::latency_histogram(&dir.join(file), &title, &median.latencies_ms) {
            Ok(()) => results.plots.push((
                "latency histogram (the median closed-loop run)".into(),
                format!("bench/{file}"),
            )),
            Err(error) => options.say(format!("{error:#}")),
        }
    }
    let mut points: Vec<plot::RatePoint> = results
        .open_loop
        .iter()
        .filter_map(|(_, _, runs)| median_point(runs))
        .collect();
    points.extend(median_point(&results.pipeline));
    if !points.is_empty() {
        let file = "rate-vs-latency.svg";
        match plot::rate_vs_latency(
            &dir.join(file),
            "courier: latency against achieved rate (open loop 25/50/90 %, and the maximum)",
            &points,
        ) {
            Ok(()) => results
                .plots
                .push(("rate against latency".into(), format!("bench/{file}"))),
            Err(error) => options.say(format!("{error:#}")),
        }
    }
}

fn median_point(runs: &[RunFigures]) -> Option<plot::RatePoint> {
    let rate = Spread::of(&runs.iter().map(|r| r.orders_per_second).collect::<Vec<_>>())?;
    let p50 = Spread::of(&runs.iter().map(|r| r.latency.p50).collect::<Vec<_>>())?;
    let p99 = Spread::of(&runs.iter().map(|r| r.latency.p99).collect::<Vec<_>>())?;
    Some(plot::RatePoint {
        rate: rate.median,
        p50_ms: p50.median,
        p99_ms: p99.median,
    })
}
