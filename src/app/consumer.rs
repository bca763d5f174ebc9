//! The consumer process: one worker per configured queue, and a small HTTP
//! endpoint with their counters.

use std::sync::Arc;

use axum::{Json, Router, routing::get};
use tokio::{net::TcpListener, task::JoinSet};

use crate::{
    amqp::{BrokerPool, Topology, broker_pool},
    config::{ConfigError, Settings},
    consume::{ConsumerStats, Worker, WorkerConfig, WorkerError, WorkerStats},
    gateway::client::GatewayClient,
    handlers::{
        Handler,
        notification::{NotificationHandler, Sender},
        refund::RefundHandler,
    },
    shutdown::Shutdown,
    store::{self, DbPool},
};

pub const APP_ID: &str = "courier-consumer";

/// What each worker task needs besides its handler.
struct Spawner<'a> {
    workers: &'a mut JoinSet<Result<(), WorkerError>>,
    db: &'a DbPool,
    broker: &'a BrokerPool,
    shutdown: &'a Shutdown,
}

impl Spawner<'_> {
    fn spawn<H: Handler>(&mut self, config: WorkerConfig, handler: H, stats: Arc<WorkerStats>) {
        let worker = Worker::new(
            config,
            Arc::new(handler),
            self.db.clone(),
            self.broker.clone(),
            stats,
        );
        self.workers.spawn(worker.run(self.shutdown.clone()));
    }
}

/// Runs every worker named in `consumer.workers` until `shutdown`, and serves
/// `GET /stats`, `/metrics`, `/healthz` and `/readyz` on `stats_listener`. If the broker refuses
/// the consumer's user, every worker stops and this returns a [`ConfigError`].
pub async fn run_until_stopped(
    settings: Settings,
    stats_listener: TcpListener,
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
    let broker = broker_pool(&settings.amqp, &settings.amqp.consumer, APP_ID)?;
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
        let mut spawner = Spawner {
            workers: &mut workers,
            db: &db,
            broker: &broker,
            shutdown: &shutdown,
        };
        match name.as_str() {
            crate::handlers::refund::NAME => spawner.spawn(
                config,
                RefundHandler::new(db.clone(), GatewayClient::new(&settings.gateway)?),
                worker_stats,
            ),
            crate::handlers::notification::NAME => spawner.spawn(
                config,
                NotificationHandler::new(
                    db.clone(),
                    Sender::from_settings(&settings.notifications)?,
                ),
                worker_stats,
            ),
            other => {
                anyhow::bail!("configuration key `consumer.workers` names unknown worker `{other}`")
            }
        }
    }

    tracing::info!(
        workers = ?settings.consumer.workers,
        stats = %stats_listener.local_addr()?,
        broker = %settings.amqp.display_addr_as(&settings.amqp.consumer),
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
        .route("/healthz", get(|| async { "ok" }))
        .merge(crate::observe::consumer_routes(
            stats.clone(),
            broker.clone(),
            db.clone(),
        ));
    let stats_shutdown = shutdown.clone();
    let http_settings = settings.http.clone();
    let server = tokio::spawn(async move {
        crate::http::serve(stats_listener, router, &http_settings, async move {
            stats_shutdown.wait().await;
        })
        .await
    });

    let mut refused = None;
    let mut refused_tx = Some(refused_tx);
    while let Some(joined) = workers.join_next().await {
        if let Ok(Err(WorkerError::AccessRefused(detail))) = joined {
            // One worker refused is the whole service misconfigured: stop the rest.
            if let Some(tx) = refused_tx.take() {
                let _ = tx.send(());
            }
            refused.get_or_insert(detail);
        }
    }
    server.abort();
    tracing::info!(stats = ?stats.snapshot(), "consumer stopped");
    match refused {
        Some(detail) => Err(ConfigError::BrokerAccess {
            user: settings.amqp.consumer.user.clone(),
            role: "consumer",
            detail,
        }
        .into()),
        None => Ok(()),
    }
}
