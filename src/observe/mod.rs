//! What the services tell their operators over HTTP: `/metrics` in the
//! Prometheus text format and `/readyz` (broker and database reachable), next
//! to the `/healthz` every service already answers (the process is up).
//!
//! Metrics are derived at scrape time from the counters the relay and the
//! workers keep anyway ([`crate::outbox::RelayStats`],
//! [`crate::consume::WorkerStats`]), and the outbox figures are queried then:
//! one registry per service instance, no global recorder, so services running
//! side by side in one test process never mix their numbers.

pub mod metrics;
pub mod ready;

use std::sync::Arc;

use axum::{Router, http::header, response::IntoResponse, routing::get};

use crate::{
    amqp::BrokerPool, consume::ConsumerStats, domain::Publisher, outbox::RelayStats, store::DbPool,
};

/// The content type Prometheus expects for the text format.
const TEXT_FORMAT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `/metrics` and `/readyz` of a service: its relays (with their
/// publishers' outbox backlog), its workers and its own `gauges`.
pub fn routes(
    relays: Vec<(Publisher, Arc<RelayStats>)>,
    workers: ConsumerStats,
    gauges: Vec<metrics::ServiceGauge>,
    broker: BrokerPool,
    db: DbPool,
) -> Router {
    let metrics_db = db.clone();
    let relays = Arc::new(relays);
    let gauges = Arc::new(gauges);
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let (relays, workers, gauges, db) = (
                    relays.clone(),
                    workers.clone(),
                    gauges.clone(),
                    metrics_db.clone(),
                );
                async move { text(metrics::service(&relays, &workers, &gauges, &db).await) }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let (broker, db) = (broker.clone(), db.clone());
                async move { ready::answer(&broker, &db).await }
            }),
        )
}

fn text(body: String) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, TEXT_FORMAT)], body)
}
