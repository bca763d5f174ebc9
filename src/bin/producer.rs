//! The order service: HTTP API + outbox relay.

use clap::Parser;
use courier::{app::producer, config::Settings};

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
    courier::telemetry::init("producer");
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("producer: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let listen = args.listen.unwrap_or(settings.producer.listen);
    let result = async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        producer::run_until_stopped(settings, listener, courier::shutdown::signal()).await
    };
    match result.await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("producer failed: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
