//! The order service: the HTTP API and the outbox relay in one process.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::{
    amqp::{Topology, broker_pool},
    config::Settings,
    http,
    outbox::Relay,
    shutdown::Shutdown,
    store,
};

pub const APP_ID: &str = "courier-producer";

/// Serves the API on `listener` and relays the outbox until `shutdown`.
/// Neither the API nor the relay needs the other's dependency to be up: the
/// API keeps taking cancellations while the broker is down.
pub async fn run_until_stopped(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = Shutdown::on(shutdown);
    let db = store::pool(&settings.database)?;
    let broker = broker_pool(&settings.amqp, APP_ID)?;
    let relay = Arc::new(Relay::new(
        db.clone(),
        broker,
        Topology::from_settings(&settings.topology),
        settings.relay.clone(),
        APP_ID,
    ));
    let relay_task = tokio::spawn(relay.run(settings.database.url(), shutdown.clone()));

    tracing::info!(listen = %listener.local_addr()?, broker = %settings.amqp.display_addr(), "order service up");
    let api_shutdown = shutdown.clone();
    axum::serve(listener, http::router(db))
        .with_graceful_shutdown(async move { api_shutdown.wait().await })
        .await?;
    if tokio::time::timeout(settings.shutdown.deadline, relay_task)
        .await
        .is_err()
    {
        tracing::warn!("relay did not stop within the shutdown deadline");
    }
    tracing::info!("order service stopped");
    Ok(())
}
