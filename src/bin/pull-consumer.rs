//! An example pull consumer of the order service's event API, keeping its
//! own offset: how a system that does not listen to the broker reads courier.
//!
//! ```bash
//! target/release/pull-consumer --api http://127.0.0.1:8080 --reader audit
//! ```
//!
//! It reads `GET /api/events?after=<offset>` page by page, applies each page
//! (here: keeps a copy in `event_reader_log`) and stores the offset after it
//! in the same transaction, in its own tables (`event_reader_offsets`), in
//! the database of `[database]` in courier's configuration. Kill it at any
//! moment and start it again: it resumes after the last page it committed,
//! nothing read twice, nothing skipped. If the events after its offset were
//! pruned (`courier outbox prune`), it stops with exit 1 and says so.

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use courier::{config::Settings, event_reader::EventReader, shutdown::Shutdown, store};

/// Reads the order service's events page by page and keeps its offset in its
/// own table, committed with what it did with each page.
///
/// Configuration (its database): config/default.toml < config/$COURIER_ENV.toml <
/// COURIER__DATABASE__* environment variables.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// The order service's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// This reader's name: its offset is kept under it.
    #[arg(long, default_value = "example")]
    reader: String,
    /// Events per request.
    #[arg(long, default_value_t = 100)]
    page_size: i64,
    /// How long to wait when caught up.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("pull-consumer: {error}");
            return ExitCode::from(2);
        }
    };
    courier::telemetry::init("pull-consumer", settings.log.format);
    let read = async {
        let db = store::pool(&settings.database)?;
        let reader = EventReader::new(&args.api, &args.reader, db, args.page_size).await?;
        reader
            .run(
                args.poll_interval,
                Shutdown::on(courier::shutdown::signal()),
            )
            .await?;
        anyhow::Ok(())
    };
    match read.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("pull-consumer failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}
