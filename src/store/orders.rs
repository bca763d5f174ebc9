//! The `orders` table, and the one place that opens the transaction writing an
//! order change together with its outbox row.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{
    ConnectionFailure, StoreError, outbox,
    schema::{orders, refunds},
};
use crate::domain::{
    AmountCents, CancelError, CustomerEmail, EventId, Order, OrderId, OrderState, PaymentId,
    ShipError, ShippingAddress,
};

#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = orders)]
#[diesel(check_for_backend(diesel::pg::Pg))]
struct OrderRow {
    id: Uuid,
    payment_id: String,
    amount_cents: i64,
    customer_email: String,
    shipping_address: Option<String>,
    state: String,
    version: i64,
    refund_status: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<&Order> for OrderRow {
    fn from(order: &Order) -> Self {
        Self {
            id: order.id.as_uuid(),
            payment_id: order.payment_id.as_str().to_owned(),
            amount_cents: order.amount.cents(),
            customer_email: order.customer_email.as_str().to_owned(),
            shipping_address: order
                .shipping_address
                .as_ref()
                .map(|a| a.as_str().to_owned()),
            state: order.state.as_str().to_owned(),
            version: order.version,
            refund_status: order.refund_status.clone(),
            created_at: order.created_at,
            updated_at: order.updated_at,
        }
    }
}

impl TryFrom<OrderRow> for Order {
    type Error = diesel::result::Error;

    fn try_from(row: OrderRow) -> Result<Self, Self::Error> {
        let corrupt = |what: String| {
            diesel::result::Error::DeserializationError(format!("order {}: {what}", row.id).into())
        };
        Ok(Order {
            id: OrderId::from_uuid(row.id),
            payment_id: PaymentId::parse(&row.payment_id).map_err(|e| corrupt(e.to_string()))?,
            amount: AmountCents::parse(row.amount_cents).map_err(|e| corrupt(e.to_string()))?,
            customer_email: CustomerEmail::parse(&row.customer_email)
                .map_err(|e| corrupt(e.to_string()))?,
            shipping_address: row
                .shipping_address
                .as_deref()
                .map(ShippingAddress::parse)
                .transpose()
                .map_err(|e| corrupt(e.to_string()))?,
            state: OrderState::parse(&row.state)
                .ok_or_else(|| corrupt(format!("unknown state `{}`", row.state)))?,
            version: row.version,
            refund_status: row.refund_status.clone(),
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

/// The order and whether it already has its one refund, in one round trip:
/// what the refund side checks before any money moves.
pub async fn find_with_refund(
    conn: &mut AsyncPgConnection,
    id: OrderId,
) -> Result<Option<(Order, bool)>, StoreError> {
    let row = orders::table
        .find(id.as_uuid())
        .select((
            OrderRow::as_select(),
            diesel::dsl::exists(refunds::table.filter(refunds::order_id.eq(orders::id))),
        ))
        .first::<(OrderRow, bool)>(conn)
        .await
        .optional()
        .map_err(StoreError::classify)?;
    row.map(|(order, refunded)| Order::try_from(order).map(|order| (order, refunded)))
        .transpose()
        .map_err(StoreError::Query)
}

/// Why a state change on an order did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ChangeOrderError<R> {
    #[error("order {0} not found")]
    NotFound(OrderId),
    #[error(transparent)]
    Refused(R),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl<R> ConnectionFailure for ChangeOrderError<R> {
    fn is_connection_failure(&self) -> bool {
        matches!(self, Self::Store(error) if error.is_unavailable())
    }
}

impl<R> From<diesel::result::Error> for ChangeOrderError<R> {
    fn from(error: diesel::result::Error) -> Self {
        Self::Store(StoreError::classify(error))
    }
}

pub async fn insert(conn: &mut AsyncPgConnection, order: &Order) -> Result<(), StoreError> {
    diesel::insert_into(orders::table)
        .values(OrderRow::from(order))
        .execute(conn)
        .await
        .map_err(StoreError::classify)?;
    Ok(())
}

pub async fn find(conn: &mut AsyncPgConnection, id: OrderId) -> Result<Option<Order>, StoreError> {
    let row = orders::table
        .find(id.as_uuid())
        .select(OrderRow::as_select())
        .first(conn)
        .await
        .optional()
        .map_err(StoreError::classify)?;
    row.map(Order::try_from)
        .transpose()
        .map_err(StoreError::Query)
}

async fn lock(conn: &mut AsyncPgConnection, id: OrderId) -> QueryResult<Option<Order>> {
    orders::table
        .find(id.as_uuid())
        .select(OrderRow::as_select())
        .for_update()
        .first(conn)
        .await
        .optional()?
        .map(Order::try_from)
        .transpose()
}

async fn save(conn: &mut AsyncPgConnection, order: &Order) -> QueryResult<()> {
    diesel::update(orders::table.find(order.id.as_uuid()))
        .set(OrderRow::from(order))
        .execute(conn)
        .await?;
    Ok(())
}

/// Cancels an order: one transaction updates the order and inserts its
/// `OrderCanceled` into the outbox, so both commit or neither does (P1).
/// Nothing here talks to the broker; the relay publishes after commit.
pub async fn cancel(
    conn: &mut AsyncPgConnection,
    id: OrderId,
    correlation_id: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(Order, EventId), ChangeOrderError<CancelError>> {
    conn.transaction(async |conn| {
        let Some(mut order) = lock(conn, id).await? else {
            return Err(ChangeOrderError::NotFound(id));
        };
        let event = order.cancel(now).map_err(ChangeOrderError::Refused)?;
        let record = event
            .to_record()
            .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
        save(conn, &order).await?;
        outbox::insert(conn, &record, correlation_id).await?;
        Ok((order, event.event_id))
    })
    .await
}

/// Marks an order shipped (no event yet: nothing consumes shipping in this version).
pub async fn ship(
    conn: &mut AsyncPgConnection,
    id: OrderId,
    now: DateTime<Utc>,
) -> Result<Order, ChangeOrderError<ShipError>> {
    conn.transaction(async |conn| {
        let Some(mut order) = lock(conn, id).await? else {
            return Err(ChangeOrderError::NotFound(id));
        };
        order.ship(now).map_err(ChangeOrderError::Refused)?;
        save(conn, &order).await?;
        Ok(order)
    })
    .await
}

/// Counts orders per state, for the demo's and the checker's ground truth.
pub async fn count_in_state(
    conn: &mut AsyncPgConnection,
    state: OrderState,
) -> Result<i64, StoreError> {
    orders::table
        .filter(orders::state.eq(state.as_str()))
        .count()
        .get_result(conn)
        .await
        .map_err(StoreError::classify)
}
