//! `GET /api/events?after=<offset>&limit=<n>`: the order service's events for
//! pull readers, in commit order, from the outbox (which keeps rows after
//! publishing). A reader keeps the `offset` of the last event it applied and
//! passes it back as `after` (`next_after` is that value); nothing can ever
//! appear before it later ([`crate::store::event_store`] says why).
//!
//! Retention: `courier outbox prune` removes the oldest published events.
//! A reader whose `after` is behind what was pruned is answered 410 Gone,
//! naming the last pruned offset and the oldest one kept, never handed the
//! rest as if nothing were missing.

use axum::{
    Json, Router,
    extract::{Query, State, rejection::QueryRejection},
    routing::get,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ApiError;
use crate::{
    domain::Publisher,
    store::{
        DbPool,
        event_store::{self, Page, StoredEvent, StreamPosition},
        retry_once_if_unavailable,
    },
};

/// Events per page when the reader does not say.
pub const DEFAULT_LIMIT: i64 = 100;
/// The most events one page holds; a larger `limit` is cut to this.
pub const MAX_LIMIT: i64 = 1000;

pub fn routes() -> Router<DbPool> {
    Router::new().route("/api/events", get(events))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    after: Option<String>,
    limit: Option<i64>,
}

/// One event as the API serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedEvent {
    /// Where this event is in the stream: pass it as `after` to read on.
    pub offset: String,
    pub event_id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    pub version: i32,
    pub aggregate: Aggregate,
    pub occurred_at: DateTime<Utc>,
    pub content_type: String,
    pub correlation_id: Option<String>,
    pub payload: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    #[serde(rename = "type")]
    pub aggregate_type: String,
    pub id: String,
    pub version: i64,
}

/// One page of the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsPage {
    pub events: Vec<PublishedEvent>,
    /// What to pass as `after` next: the last event's offset, or the
    /// request's own `after` when there was nothing new.
    pub next_after: String,
}

impl From<StoredEvent> for PublishedEvent {
    fn from(event: StoredEvent) -> Self {
        Self {
            offset: event.position().to_string(),
            event_id: event.event_id,
            event_type: event.event_type,
            version: event.event_version,
            aggregate: Aggregate {
                aggregate_type: event.aggregate_type,
                id: event.aggregate_id,
                version: event.aggregate_version,
            },
            occurred_at: event.occurred_at,
            content_type: event.content_type,
            correlation_id: event.correlation_id,
            payload: event.payload,
        }
    }
}

async fn events(
    State(db): State<DbPool>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<EventsPage>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let after = match query.after.as_deref() {
        None => StreamPosition::START,
        Some(raw) => raw
            .parse()
            .map_err(|e: event_store::BadPosition| ApiError::BadRequest(e.to_string()))?,
    };
    let limit = match query.limit {
        None => DEFAULT_LIMIT,
        Some(n) if n >= 1 => n.min(MAX_LIMIT),
        Some(n) => {
            return Err(ApiError::BadRequest(format!(
                "limit {n} is not a positive number of events (at most {MAX_LIMIT} are served at once)"
            )));
        }
    };
    let page = retry_once_if_unavailable(&db, async |conn| {
        event_store::read(conn, Publisher::Orders, after, limit).await
    })
    .await?;
    match page {
        Page::Events(events) => {
            let events: Vec<PublishedEvent> = events.into_iter().map(Into::into).collect();
            let next_after = events
                .last()
                .map_or_else(|| after.to_string(), |e| e.offset.clone());
            Ok(Json(EventsPage { events, next_after }))
        }
        Page::Pruned { through, oldest } => Err(ApiError::Gone {
            message: format!(
                "the events after offset {after} up to offset {through} were pruned; \
                 to read what is kept, start again with after={through}"
            ),
            pruned_through: through.to_string(),
            oldest_available_offset: oldest.map(|o| o.to_string()),
        }),
    }
}
