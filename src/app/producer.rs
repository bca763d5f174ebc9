//! The order service: the HTTP API, the order events' relay, and the
//! workers that take the refund context's news back to the orders, in one
//! process.

use std::sync::Arc;

use tokio::net::TcpListener;

use super::background::Background;
use crate::{
    config::Settings, domain::Publisher, http, observe::metrics::ServiceGauge, registry::Process,
    store,
};

pub const APP_ID: &str = "courier-producer";

/// Serves the API on `listener`, relays the outbox's order events and runs
/// the order service's workers until `shutdown`. The API needs neither the
/// broker nor the others to be up: it keeps taking cancellations while the
/// broker is down. If the broker refuses the producer's user, the whole
/// service stops with a [`crate::config::ConfigError`]: running on without a
/// relay would only fill the outbox.
pub async fn run_until_stopped(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // The API's connections are its own: background work never takes the
    // API's last connection, and a request never waits behind a relay step.
    // The refund-status worker needs few (connections are opened on demand,
    // up to this); the relay has a pool of its own ([`Background::start`]).
    let api_db = store::pool(&settings.database)?;
    let mut background_settings = settings.database.clone();
    background_settings.pool_size = background_settings.pool_size.min(3);
    let background_db = store::pool(&background_settings)?;
    let (background, shutdown) =
        Background::start(Process::Producer, &settings, &background_db, shutdown)?;

    tracing::info!(listen = %listener.local_addr()?, broker = %settings.amqp.display_addr_as(&settings.amqp.producer), "order service up");
    let api_shutdown = shutdown.clone();
    let batching = http::CancelBatching {
        max: settings.producer.cancel_batch_max,
        in_flight: settings.producer.cancel_batches_in_flight,
    };
    // The cancels' events go straight to this process's relay.
    let cancels = http::CancelQueue::spawn(
        api_db.clone(),
        batching,
        background.handoff(Publisher::Orders),
    );
    let queued = cancels.clone();
    let gauges = vec![ServiceGauge {
        name: "courier_cancels_queued",
        help: "Cancel requests waiting for their batch to be written.",
        read: Arc::new(move || queued.queued() as f64),
    }];
    let routes =
        http::router(api_db, cancels).merge(background.observe_routes(&background_db, gauges));
    http::serve(listener, routes, &settings.http, async move {
        api_shutdown.wait().await;
    })
    .await?;
    let stopped = background.join(&settings);
    match tokio::time::timeout(settings.shutdown.deadline, stopped).await {
        Err(_) => {
            tracing::warn!("relay or workers did not stop within the shutdown deadline");
        }
        Ok(result) => result?,
    }
    tracing::info!("order service stopped");
    Ok(())
}
