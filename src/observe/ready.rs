//! `/readyz`: can this service do its work right now? Both the broker and
//! the database must answer within a short deadline; `/healthz` only says
//! the process is up.

use std::time::Duration;

use axum::{Json, http::StatusCode};
use serde::Serialize;

use crate::{
    amqp::BrokerPool,
    store::{self, DbPool},
};

/// How long each dependency may take to answer a probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// `ok`, or why not.
    pub broker: String,
    pub database: String,
}

/// Probes both: a channel opened and closed on a pooled broker connection
/// (a connection that merely looks open, say blackholed, does not count),
/// and a `SELECT 1`.
pub async fn check(broker: &BrokerPool, db: &DbPool) -> Readiness {
    let broker_probe = async {
        let connection = broker.get().await.map_err(|e| e.to_string())?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        let _ = channel.close(200, "ready".into()).await;
        Ok::<(), String>(())
    };
    let (broker, database) = tokio::join!(
        within(broker_probe),
        within(async { store::ping(db).await.map_err(|e| e.to_string()) })
    );
    Readiness {
        ready: broker == "ok" && database == "ok",
        broker,
        database,
    }
}

async fn within(probe: impl Future<Output = Result<(), String>>) -> String {
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(error)) => format!("unreachable: {error}"),
        Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
    }
}

/// 200 when ready, 503 otherwise, with what each dependency said.
pub async fn answer(broker: &BrokerPool, db: &DbPool) -> (StatusCode, Json<Readiness>) {
    let readiness = check(broker, db).await;
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness))
}
