//! `payment-gateway`: runs the payment gateway simulator
//! ([`courier::gateway::simulator`]); this file only reads flags and config.

use std::{net::SocketAddr, process::ExitCode};

use anyhow::Context;
use clap::Parser;
use courier::{
    config::{GatewaySimulatorSettings, HttpSettings},
    gateway::simulator,
};
use tokio::net::TcpListener;

/// Stands in for the external payment system that the refund handler calls.
#[derive(Debug, Parser)]
#[command(
    name = "payment-gateway",
    version,
    long_about = "Stands in for the external payment system that courier's refund handler calls.\n\n\
        It serves POST /refunds (idempotent on the Idempotency-Key header: one key, at most \
        one refund), GET /refunds (the ledger of every refund made, for checkers), \
        GET /stats and GET /healthz. It injects faults on purpose: a fixed latency, \
        transient 503 failures at a configured rate (reproducible from a seed), and payment \
        ids that are always refused with a permanent 422.",
    after_long_help = "Configuration (config/default.toml < config/$COURIER_ENV.toml < environment):\n  \
        gateway_simulator.listen                COURIER__GATEWAY_SIMULATOR__LISTEN\n  \
        gateway_simulator.latency               COURIER__GATEWAY_SIMULATOR__LATENCY (e.g. 5ms)\n  \
        gateway_simulator.transient_error_rate  COURIER__GATEWAY_SIMULATOR__TRANSIENT_ERROR_RATE (0.0-1.0)\n  \
        gateway_simulator.seed                  COURIER__GATEWAY_SIMULATOR__SEED\n  \
        gateway_simulator.failing_payment_ids   COURIER__GATEWAY_SIMULATOR__FAILING_PAYMENT_IDS (e.g. '[\"pay-1\"]')\n  \
        http.header_read_timeout                COURIER__HTTP__HEADER_READ_TIMEOUT (e.g. 10s)\n  \
        http.idle_timeout                       COURIER__HTTP__IDLE_TIMEOUT (e.g. 60s)\n  \
        http.max_connections                    COURIER__HTTP__MAX_CONNECTIONS\n\n\
        COURIER_CONFIG_DIR (default: config) and COURIER_ENV (default: local) choose the files."
)]
struct Cli {
    /// Address to listen on [default: gateway_simulator.listen].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    courier::app::main_of(
        "payment-gateway",
        |settings| cli.listen.unwrap_or(settings.gateway_simulator.listen),
        |settings, listener| run(settings.gateway_simulator, settings.http, listener),
    )
    .await
}

async fn run(
    settings: GatewaySimulatorSettings,
    http: HttpSettings,
    listener: TcpListener,
) -> anyhow::Result<()> {
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    tracing::info!(
        %addr,
        latency = ?settings.latency,
        transient_error_rate = settings.transient_error_rate,
        seed = settings.seed,
        failing_payment_ids = ?settings.failing_payment_ids,
        "payment gateway simulator listening"
    );
    simulator::serve(listener, &settings, &http, courier::shutdown::signal()).await?;
    tracing::info!("payment gateway simulator stopped");
    Ok(())
}
