//! Read-only queries for the checker (`crate::check`): what our database says
//! about every canceled order, its refund and its status, the events still
//! pending, and the shipping read model against the orders. Nothing here is
//! on the order or refund path.

use diesel::{
    QueryableByName,
    prelude::*,
    sql_types::{BigInt, Nullable, Text, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::schema::{orders, outbox, refunds};
use crate::domain::{OrderCanceled, OrderState, ShippingInfoChanged};

/// Every `order.canceled` event: (event id, order id as stored).
pub async fn canceled_events(conn: &mut AsyncPgConnection) -> QueryResult<Vec<(Uuid, String)>> {
    outbox::table
        .filter(outbox::event_type.eq(OrderCanceled::TYPE))
        .select((outbox::event_id, outbox::aggregate_id))
        .load(conn)
        .await
}

/// Every canceled order and its refund status (`None`: none yet).
pub async fn canceled_orders(
    conn: &mut AsyncPgConnection,
) -> QueryResult<Vec<(Uuid, Option<String>)>> {
    orders::table
        .filter(orders::state.eq(OrderState::Canceled.as_str()))
        .select((orders::id, orders::refund_status))
        .load(conn)
        .await
}

/// The order of every refund row, once per row.
pub async fn refunded_orders(conn: &mut AsyncPgConnection) -> QueryResult<Vec<Uuid>> {
    refunds::table.select(refunds::order_id).load(conn).await
}

/// Every event still waiting for the broker: (event id, aggregate id).
pub async fn pending_events(conn: &mut AsyncPgConnection) -> QueryResult<Vec<(Uuid, String)>> {
    outbox::table
        .filter(outbox::published_at.is_null())
        .select((outbox::event_id, outbox::aggregate_id))
        .load(conn)
        .await
}

/// One order whose shipping address changed, against the read model.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct ShippingFacts {
    #[diesel(sql_type = SqlUuid)]
    pub order_id: Uuid,
    /// The order's address now.
    #[diesel(sql_type = Nullable<Text>)]
    pub address: Option<String>,
    /// The version of its newest `order.shipping-info-changed` in the outbox.
    #[diesel(sql_type = BigInt)]
    pub newest_version: i64,
    /// What `shipments` holds, if anything.
    #[diesel(sql_type = Nullable<Text>)]
    pub applied_address: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub applied_version: Option<i64>,
}

/// Every order with a shipping change in the outbox, with its read model row.
pub async fn shipping(conn: &mut AsyncPgConnection) -> QueryResult<Vec<ShippingFacts>> {
    diesel::sql_query(
        "SELECT o.id AS order_id, o.shipping_address AS address, e.newest_version, \
                s.shipping_address AS applied_address, s.applied_version \
         FROM (SELECT aggregate_id, max(aggregate_version) AS newest_version FROM outbox \
               WHERE event_type = $1 GROUP BY aggregate_id) e \
         JOIN orders o ON o.id::text = e.aggregate_id \
         LEFT JOIN shipments s ON s.order_id = o.id",
    )
    .bind::<Text, _>(ShippingInfoChanged::TYPE)
    .load(conn)
    .await
}
