//! The consumers: refunds and notifications.

use clap::Parser;
use courier::{app::consumer, config::Settings};

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
    courier::telemetry::init("consumer");
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("consumer: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let listen = args.stats_listen.unwrap_or(settings.consumer.stats_listen);
    let result = async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        consumer::run_until_stopped(settings, listener, courier::shutdown::signal()).await
    };
    match result.await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("consumer failed: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
