//! The consumer process: one worker per configured queue, and a small HTTP
//! endpoint with their counters.

use std::sync::Arc;

use axum::{Json, Router, routing::get};
use tokio::{net::TcpListener, task::JoinSet};

use crate::{
    amqp::{Topology, broker_pool},
    config::Settings,
    consume::{ConsumerStats, Worker, WorkerConfig, WorkerStats},
    gateway::client::GatewayClient,
    handlers::{
        notification::{NotificationHandler, Sender},
        refund::RefundHandler,
    },
    shutdown::Shutdown,
    store,
};

pub const APP_ID: &str = "courier-consumer";

/// Runs every worker named in `consumer.workers` until `shutdown`, and serves
/// `GET /stats` and `GET /healthz` on `stats_listener`.
pub async fn run_until_stopped(
    settings: Settings,
    stats_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = Shutdown::on(shutdown);
    let db = store::pool(&settings.database)?;
    let broker = broker_pool(&settings.amqp, APP_ID)?;
    let topology = Topology::from_settings(&settings.topology);
    let mut stats = ConsumerStats::default();
    let mut workers = JoinSet::new();

    for name in &settings.consumer.workers {
        let Some(queues) = topology.worker(name).cloned() else {
            anyhow::bail!("configuration key `consumer.workers` names unknown worker `{name}`");
        };
        let worker_stats = Arc::new(WorkerStats::new(&queues.retry_queues()));
        stats.add(name, worker_stats.clone());
        let config = WorkerConfig {
            queues,
            topology: topology.clone(),
            settings: settings.consumer.clone(),
            publish_timeout: settings.relay.confirm_timeout,
            shutdown_deadline: settings.shutdown.deadline,
        };
        match name.as_str() {
            crate::handlers::refund::NAME => {
                let handler =
                    RefundHandler::new(db.clone(), GatewayClient::new(&settings.gateway)?);
                let worker = Worker::new(
                    config,
                    Arc::new(handler),
                    db.clone(),
                    broker.clone(),
                    worker_stats,
                );
                workers.spawn(worker.run(shutdown.clone()));
            }
            crate::handlers::notification::NAME => {
                let handler = NotificationHandler::new(
                    db.clone(),
                    Sender::from_settings(&settings.notifications)?,
                );
                let worker = Worker::new(
                    config,
                    Arc::new(handler),
                    db.clone(),
                    broker.clone(),
                    worker_stats,
                );
                workers.spawn(worker.run(shutdown.clone()));
            }
            other => {
                anyhow::bail!("configuration key `consumer.workers` names unknown worker `{other}`")
            }
        }
    }

    tracing::info!(
        workers = ?settings.consumer.workers,
        stats = %stats_listener.local_addr()?,
        broker = %settings.amqp.display_addr(),
        "consumer up"
    );
    let stats_for_route = stats.clone();
    let router = Router::new()
        .route(
            "/stats",
            get(move || {
                let stats = stats_for_route.clone();
                async move { Json(stats.snapshot()) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    let stats_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(stats_listener, router)
            .with_graceful_shutdown(async move { stats_shutdown.wait().await })
            .await
    });

    while workers.join_next().await.is_some() {}
    server.abort();
    tracing::info!(stats = ?stats.snapshot(), "consumer stopped");
    Ok(())
}
