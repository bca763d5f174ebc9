//! The benchmark: `bash scripts/bench.sh` builds the release binaries and runs this.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use courier::{
    bench::{self, BenchOptions, env::Management},
    config::Settings,
};

/// Measures courier against the machine's RabbitMQ and PostgreSQL (in a vhost
/// and a database of its own): the broker's and the database's ceilings, the
/// pipeline through the real binaries, latency under open-loop load, a backlog
/// drain, and a Celery peer doing the same job. Prints the table and writes it
/// into BENCHMARKS.md with two SVG plots.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// Small sizes, for a smoke run (the table is not meaningful).
    #[arg(long)]
    quick: bool,
    /// Orders per pipeline run [default: 5000, quick 100].
    #[arg(long)]
    orders: Option<usize>,
    /// Concurrent HTTP clients canceling.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Repetitions of every figure (at least 3 for a real table).
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// Orders canceled while the consumer is stopped [default: 10000, quick 100]; 0 skips it.
    #[arg(long)]
    backlog: Option<usize>,
    /// Messages per broker-limit run [default: 20000, quick 500].
    #[arg(long)]
    broker_messages: Option<usize>,
    /// Transactions per database-limit run [default: 1500, quick 50].
    #[arg(long)]
    db_ops: Option<usize>,
    /// Seconds each open-loop rate is offered [default: 8, quick 1].
    #[arg(long)]
    open_loop_seconds: Option<f64>,
    /// Leave out the Celery peer.
    #[arg(long)]
    no_peer: bool,
    /// Only the closed-loop pipeline runs, and the Celery peer unless
    /// --no-peer (no ceilings, backlog, or open loop unless
    /// --open-loop-fractions is given): for measuring one change quickly.
    #[arg(long)]
    pipeline_only: bool,
    /// Open-loop rates to offer, as fractions of the measured closed-loop
    /// maximum [default: 0.25,0.5,0.9].
    #[arg(long, value_delimiter = ',')]
    open_loop_fractions: Option<Vec<f64>>,
    /// Open-loop rates in orders/s, offered instead of the fractions: to
    /// compare two builds at the same load (implies the open loop with
    /// --pipeline-only).
    #[arg(long, value_delimiter = ',')]
    open_loop_rates: Option<Vec<f64>>,
    /// Where BENCHMARKS.md (and bench/*.svg) are written.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    /// Directory of the producer, consumer and payment-gateway binaries
    /// [default: the directory of this binary].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Write every courier pipeline run's per-order timestamps (cancel,
    /// publish, refund) as CSV into this directory, one file per run.
    #[arg(long)]
    timings_dir: Option<PathBuf>,
    #[arg(long, default_value = "var/bench-logs")]
    log_dir: PathBuf,
    #[arg(long, default_value = "bench/peer")]
    peer_dir: PathBuf,
    #[arg(long, default_value = "var/bench-venv")]
    venv: PathBuf,
    /// RabbitMQ management API (creates the bench's vhost).
    #[arg(long, default_value = "http://127.0.0.1:15672")]
    management_url: String,
    #[arg(long, default_value = "guest")]
    management_user: String,
    #[arg(
        long,
        default_value = "guest",
        env = "COURIER_BENCH_MANAGEMENT_PASSWORD"
    )]
    management_password: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    courier::telemetry::init("bench", courier::telemetry::LogFormat::Text);
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("bench: {error}");
            return ExitCode::from(2);
        }
    };
    match run(cli, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, settings: Settings) -> anyhow::Result<()> {
    let absolute = |path: PathBuf| std::path::absolute(&path).unwrap_or(path);
    let bin_dir = match cli.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .ok_or_else(|| anyhow::anyhow!("cannot tell this binary's directory"))?,
    };
    let quick = cli.quick;
    let pick = |given: Option<usize>, full: usize, small: usize| {
        given.unwrap_or(if quick { small } else { full })
    };
    let mut options = BenchOptions {
        orders: pick(cli.orders, 5000, 100),
        clients: cli.clients,
        repetitions: cli.repetitions,
        broker_messages: pick(cli.broker_messages, 20_000, 500),
        db_ops: pick(cli.db_ops, 1500, 50),
        db_connections: vec![1, 4, 16],
        open_loop_seconds: cli
            .open_loop_seconds
            .unwrap_or(if quick { 1.0 } else { 8.0 }),
        open_loop_fractions: cli
            .open_loop_fractions
            .clone()
            .unwrap_or_else(|| vec![0.25, 0.5, 0.9]),
        open_loop_rates: cli.open_loop_rates.clone().unwrap_or_default(),
        backlog: pick(cli.backlog, 10_000, 100),
        skip_peer: cli.no_peer,
        bin_dir: absolute(bin_dir),
        log_dir: absolute(cli.log_dir),
        peer_dir: absolute(cli.peer_dir),
        venv: absolute(cli.venv),
        out_dir: absolute(cli.out_dir),
        timings_dir: cli.timings_dir.map(absolute),
        repo: absolute(PathBuf::from(".")),
        management: Management {
            url: cli.management_url,
            user: cli.management_user,
            password: cli.management_password,
        },
        command: command_line(),
        show_progress: true,
    };
    if cli.pipeline_only {
        options.broker_messages = 0;
        options.db_connections.clear();
        if cli.open_loop_fractions.is_none() && cli.open_loop_rates.is_none() {
            options.open_loop_fractions.clear();
        }
        options.backlog = 0;
    }
    let results = bench::run(&settings, &options).await?;
    println!("{}", results.markdown_table());
    println!(
        "written into {}",
        options.out_dir.join("BENCHMARKS.md").display()
    );
    Ok(())
}

/// How the bench was started, for the report (the script's name when it ran us).
fn command_line() -> String {
    std::env::var("COURIER_BENCH_COMMAND").unwrap_or_else(|_| {
        let args: Vec<String> = std::env::args().collect();
        format!("target/release/bench {}", args[1..].join(" "))
            .trim_end()
            .to_owned()
    })
}
