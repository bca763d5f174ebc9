//! The consumers: refunds and notifications.

use clap::Parser;
use courier::app::{self, consumer};

/// courier's consumers: take events from RabbitMQ with manual acks, make each
/// effect once (inbox), retry transient failures through delay queues and
/// shelve poison or exhausted messages in `<queue>.dead` with the reason.
///
/// Configuration: config/default.toml < config/$COURIER_ENV.toml <
/// COURIER__SECTION__KEY environment variables (e.g. COURIER__CONSUMER__PREFETCH).
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Address for GET /stats and /healthz (overrides `consumer.stats_listen`).
    #[arg(long)]
    stats_listen: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    app::main_of(
        "consumer",
        |settings| args.stats_listen.unwrap_or(settings.consumer.stats_listen),
        |settings, listener| {
            consumer::run_until_stopped(settings, listener, courier::shutdown::signal())
        },
    )
    .await
}
