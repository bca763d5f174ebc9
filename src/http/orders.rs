//! `POST /orders`, `POST /orders/{id}/cancel`, `POST /orders/{id}/ship`,
//! `GET /orders/{id}`, `GET /healthz`.

use axum::{
    Json, Router,
    extract::{Path, State, rejection::JsonRejection, rejection::PathRejection},
    http::{HeaderMap, StatusCode},
    routing::{get, post},
};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ApiError;
use crate::{
    domain::{AmountCents, CustomerEmail, EventId, Order, OrderId, PaymentId},
    store::{
        DbPool, StoreError,
        orders::{self, ChangeOrderError},
    },
};

pub fn router(db: DbPool) -> Router {
    Router::new()
        .route("/orders", post(create))
        .route("/orders/{id}", get(show))
        .route("/orders/{id}/cancel", post(cancel))
        .route("/orders/{id}/ship", post(ship))
        .route("/healthz", get(|| async { "ok" }))
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

fn parse_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(value)| value)
        .map_err(|rejection| ApiError::BadRequest(rejection.body_text()))
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
        request.shipping_address,
        Utc::now(),
    );
    let mut conn = db.get().await.map_err(StoreError::from)?;
    orders::insert(&mut conn, &order).await?;
    Ok((StatusCode::CREATED, Json(order)))
}

async fn show(
    State(db): State<DbPool>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Order>, ApiError> {
    let id = parse_id(id)?;
    let mut conn = db.get().await.map_err(StoreError::from)?;
    orders::find(&mut conn, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("order {id} not found")))
}

fn change_error<R: std::fmt::Display>(error: ChangeOrderError<R>) -> ApiError {
    match error {
        ChangeOrderError::NotFound(id) => ApiError::NotFound(format!("order {id} not found")),
        ChangeOrderError::Refused(reason) => ApiError::Conflict(reason.to_string()),
        ChangeOrderError::Store(e) => e.into(),
    }
}

async fn cancel(
    State(db): State<DbPool>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<CanceledResponse>, ApiError> {
    let id = parse_id(id)?;
    let correlation = correlation_id(&headers);
    let mut conn = db.get().await.map_err(StoreError::from)?;
    let (order, event_id) = orders::cancel(&mut conn, id, Some(&correlation), Utc::now())
        .await
        .map_err(change_error)?;
    Ok(Json(CanceledResponse { order, event_id }))
}

async fn ship(
    State(db): State<DbPool>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Order>, ApiError> {
    let id = parse_id(id)?;
    let mut conn = db.get().await.map_err(StoreError::from)?;
    orders::ship(&mut conn, id, Utc::now())
        .await
        .map(Json)
        .map_err(change_error)
}
