//! The order service: HTTP API + outbox relay.

use clap::Parser;
use courier::app::{self, producer};

/// courier's order service: takes orders and cancellations over HTTP, stores
/// each change with its event in one PostgreSQL transaction, and relays the
/// events to RabbitMQ with publisher confirms.
///
/// Configuration: config/default.toml < config/$COURIER_ENV.toml <
/// COURIER__SECTION__KEY environment variables (e.g. COURIER__PRODUCER__LISTEN).
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Address to serve the API on (overrides `producer.listen`).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    app::main_of(
        "producer",
        |settings| args.listen.unwrap_or(settings.producer.listen),
        |settings, listener| {
            producer::run_until_stopped(settings, listener, courier::shutdown::signal())
        },
    )
    .await
}
