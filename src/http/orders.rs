//! `POST /orders`, `POST /orders/{id}/cancel`, `POST /orders/{id}/ship`,
//! `PUT /orders/{id}/shipping-info`, `GET /orders/{id}`, `GET /healthz`, and
//! the event store's `GET /api/events` ([`super::events`]). Anything else a
//! client sends, however hostile, gets a 4xx with a JSON `{"error": ...}`
//! saying what is wrong.

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Path, State, rejection::JsonRejection, rejection::PathRejection},
    http::{HeaderMap, StatusCode},
    routing::{get, post, put},
};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ApiError, cancel_queue::CancelQueue};
use crate::{
    domain::{AmountCents, CustomerEmail, EventId, Order, OrderId, PaymentId, ShippingAddress},
    store::{
        DbPool,
        cancel_batch::CancelRequest,
        orders::{self, ChangeOrderError},
        retry_once_if_unavailable,
    },
};

/// The largest request body read. An order is a few hundred bytes (the longest
/// field, the shipping address, is at most 1000 characters); 64 KiB leaves ample
/// room, while a client cannot make us buffer megabytes per connection (at most
/// `http.max_connections` x 64 KiB in all). axum's default would be 2 MB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The order API; cancels go through `cancels`, which gathers them into
/// batches.
pub fn router(db: DbPool, cancels: CancelQueue) -> Router {
    let cancels: Router<DbPool> = Router::new()
        .route("/orders/{id}/cancel", post(cancel))
        .with_state(cancels);
    Router::new()
        .route("/orders", post(create))
        .route("/orders/{id}", get(show))
        .merge(cancels)
        .route("/orders/{id}/ship", post(ship))
        .route("/orders/{id}/shipping-info", put(change_shipping_info))
        .route("/healthz", get(|| async { "ok" }))
        .merge(super::events::routes())
        // After the routes: it applies to the routes registered before it.
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|| async { ApiError::NotFound("no such route".to_owned()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(db)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOrder {
    pub payment_id: String,
    pub amount_cents: i64,
    pub customer_email: String,
    #[serde(default)]
    pub shipping_address: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CanceledResponse {
    pub order: Order,
    pub event_id: EventId,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeShippingInfo {
    pub shipping_address: String,
}

#[derive(Debug, Serialize)]
pub struct ShippingInfoChangedResponse {
    pub order: Order,
    /// `null` when the address was already this one: nothing changed.
    pub event_id: Option<EventId>,
}

/// The body as `T`, or the 4xx axum's rejection stands for: 422 for a missing
/// or wrong-typed field (its text names the field), 413, 415, and 400 for
/// malformed JSON or anything else wrong with the body.
fn parse_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(value)| value)
        .map_err(|rejection| match rejection.status() {
            StatusCode::UNPROCESSABLE_ENTITY => ApiError::Unprocessable(rejection.body_text()),
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(MAX_BODY_BYTES),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                ApiError::UnsupportedMediaType(rejection.body_text())
            }
            // Whatever else is wrong with a body is the client's doing too:
            // never a 5xx.
            _ => ApiError::BadRequest(rejection.body_text()),
        })
}

fn parse_id(id: Result<Path<String>, PathRejection>) -> Result<OrderId, ApiError> {
    let Path(raw) = id.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    Uuid::parse_str(&raw)
        .map(OrderId::from_uuid)
        .map_err(|_| ApiError::BadRequest(format!("order id `{raw}` is not a UUID")))
}

/// The caller's request id, kept as the event's correlation id; at most 255
/// bytes, since it becomes an AMQP short string.
fn correlation_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 255)
        .map_or_else(|| Uuid::now_v7().to_string(), str::to_owned)
}

async fn create(
    State(db): State<DbPool>,
    body: Result<Json<CreateOrder>, JsonRejection>,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    let request = parse_body(body)?;
    let invalid = |e: crate::domain::ValueError| ApiError::Unprocessable(e.to_string());
    let order = Order::place(
        PaymentId::parse(&request.payment_id).map_err(invalid)?,
        AmountCents::parse(request.amount_cents).map_err(invalid)?,
        CustomerEmail::parse(&request.customer_email).map_err(invalid)?,
        request
            .shipping_address
            .as_deref()
            .map(ShippingAddress::parse)
            .transpose()
            .map_err(invalid)?,
        Utc::now(),
    );
    retry_once_if_unavailable(&db, async |conn| orders::insert(conn, &order).await).await?;
    Ok((StatusCode::CREATED, Json(order)))
}

async fn show(
    State(db): State<DbPool>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Order>, ApiError> {
    let id = parse_id(id)?;
    retry_once_if_unavailable(&db, async |conn| orders::find(conn, id).await)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("order {id} not found")))
}

fn change_error<R: std::fmt::Display>(error: ChangeOrderError<R>) -> ApiError {
    match error {
        ChangeOrderError::NotFound(id) => ApiError::NotFound(format!("order {id} not found")),
        ChangeOrderError::Refused(reason) => ApiError::Conflict(reason.to_string()),
        error @ ChangeOrderError::Contended(_) => ApiError::Conflict(error.to_string()),
        ChangeOrderError::Store(e) => e.into(),
    }
}

async fn cancel(
    State(cancels): State<CancelQueue>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<CanceledResponse>, ApiError> {
    let id = parse_id(id)?;
    let (order, event_id) = cancels
        .cancel(CancelRequest {
            id,
            correlation_id: Some(correlation_id(&headers)),
        })
        .await
        .map_err(change_error)?;
    Ok(Json(CanceledResponse { order, event_id }))
}

async fn change_shipping_info(
    State(db): State<DbPool>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<ChangeShippingInfo>, JsonRejection>,
) -> Result<Json<ShippingInfoChangedResponse>, ApiError> {
    let id = parse_id(id)?;
    let request = parse_body(body)?;
    let address = ShippingAddress::parse(&request.shipping_address)
        .map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    let correlation = correlation_id(&headers);
    let (order, event_id) = retry_once_if_unavailable(&db, async |conn| {
        orders::change_shipping_info(conn, id, &address, Some(&correlation), Utc::now()).await
    })
    .await
    .map_err(change_error)?;
    Ok(Json(ShippingInfoChangedResponse { order, event_id }))
}

async fn ship(
    State(db): State<DbPool>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Order>, ApiError> {
    let id = parse_id(id)?;
    retry_once_if_unavailable(&db, async |conn| orders::ship(conn, id, Utc::now()).await)
        .await
        .map(Json)
        .map_err(change_error)
}
