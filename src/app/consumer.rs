//! The consumer process: the workers the registry gives it (those named in
//! `consumer.workers`), the refund context's relay, and a small HTTP
//! endpoint with the workers' counters.

use axum::{Json, Router, routing::get};
use tokio::net::TcpListener;

use super::background::Background;
use crate::{config::Settings, registry::Process, store};

pub const APP_ID: &str = "courier-consumer";

/// Runs every worker named in `consumer.workers` and the refund context's
/// relay until `shutdown`, and serves `GET /stats`, `/metrics`, `/healthz`
/// and `/readyz` on `stats_listener`. If the broker refuses the consumer's
/// user, everything stops and this returns a [`crate::config::ConfigError`].
pub async fn run_until_stopped(
    settings: Settings,
    stats_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let db = store::pool(&settings.database)?;
    let (background, shutdown) = Background::start(Process::Consumer, &settings, &db, shutdown)?;
    let stats = background.stats().clone();

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
        .merge(background.observe_routes(&db, Vec::new()));
    let stats_shutdown = shutdown.clone();
    let http_settings = settings.http.clone();
    let server = tokio::spawn(async move {
        crate::http::serve(stats_listener, router, &http_settings, async move {
            stats_shutdown.wait().await;
        })
        .await
    });

    let stopped = background.join(&settings).await;
    server.abort();
    tracing::info!(stats = ?stats.snapshot(), "consumer stopped");
    Ok(stopped?)
}
