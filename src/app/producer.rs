//! The order service: the HTTP API and the outbox relay in one process.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::{
    amqp::{Topology, broker_pool},
    config::{ConfigError, Settings},
    http, observe,
    outbox::{Relay, RelayError},
    shutdown::Shutdown,
    store,
};

pub const APP_ID: &str = "courier-producer";

/// Serves the API on `listener` and relays the outbox until `shutdown`.
/// Neither the API nor the relay needs the other's dependency to be up: the
/// API keeps taking cancellations while the broker is down. If the broker
/// refuses the producer's user, the whole service stops with a
/// [`ConfigError`]: running on without a relay would only fill the outbox.
pub async fn run_until_stopped(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (refused_tx, refused_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = Shutdown::on(async move {
        tokio::select! {
            () = shutdown => {}
            _ = refused_rx => {}
        }
    });
    let db = store::pool(&settings.database)?;
    let broker = broker_pool(&settings.amqp, &settings.amqp.producer, APP_ID)?;
    let relay = Arc::new(Relay::new(
        db.clone(),
        broker.clone(),
        Topology::from_settings(&settings.topology),
        settings.relay.clone(),
        APP_ID,
    ));
    let relay_stats = relay.stats();
    let relay_run = relay.run(settings.database.url(), shutdown.clone());
    let relay_task = tokio::spawn(async move {
        let result = relay_run.await;
        if result.is_err() {
            let _ = refused_tx.send(());
        }
        result
    });

    tracing::info!(listen = %listener.local_addr()?, broker = %settings.amqp.display_addr_as(&settings.amqp.producer), "order service up");
    let api_shutdown = shutdown.clone();
    let routes = http::router(db.clone()).merge(observe::producer_routes(relay_stats, broker, db));
    http::serve(listener, routes, &settings.http, async move {
        api_shutdown.wait().await;
    })
    .await?;
    match tokio::time::timeout(settings.shutdown.deadline, relay_task).await {
        Err(_) => tracing::warn!("relay did not stop within the shutdown deadline"),
        Ok(Ok(Err(RelayError::AccessRefused(detail)))) => {
            return Err(ConfigError::BrokerAccess {
                user: settings.amqp.producer.user.clone(),
                role: "producer",
                detail,
            }
            .into());
        }
        Ok(_) => {}
    }
    tracing::info!("order service stopped");
    Ok(())
}
