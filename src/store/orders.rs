//! The `orders` table, and the one place that writes an order change together
//! with its outbox row: a single statement, so that both commit or neither
//! does without a transaction of our own (the outbox half of that statement
//! is the one piece of `outbox` SQL kept outside `outbox.rs`).
//!
//! A change is optimistic: read the order, let the pure domain decide, write
//! only if the order's version is still the one read; otherwise read again.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{
    ConnectionFailure, StoreError, inbox,
    prepared::prepared_sql,
    schema::{orders, refunds},
};
use crate::domain::{
    AmountCents, CancelError, CustomerEmail, EventId, EventRecord, Order, OrderId, OrderState,
    PaymentId, RefundStatus, ShipError, ShippingAddress, ShippingInfoError,
};

/// How many times a change reads the order and decides again after another
/// writer changed it in between, before the caller is told to try later.
/// Contention on one order is rare (a cancel racing a ship or a second
/// cancel), and the loser's second read usually lets the domain refuse.
const CHANGE_ATTEMPTS: usize = 3;

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = orders)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub(super) struct OrderRow {
    id: Uuid,
    payment_id: String,
    amount_cents: i64,
    customer_email: String,
    shipping_address: Option<String>,
    state: String,
    version: i64,
    refund_status: Option<String>,
    refund_failure_reason: Option<String>,
    refund_status_at: Option<DateTime<Utc>>,
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
            refund_status: order.refund_status.as_ref().map(|s| s.as_str().to_owned()),
            refund_failure_reason: order
                .refund_status
                .as_ref()
                .and_then(|s| s.reason().map(str::to_owned)),
            refund_status_at: order.refund_status.as_ref().map(RefundStatus::at),
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
            refund_status: stored_refund_status(
                row.refund_status.as_deref(),
                row.refund_failure_reason.clone(),
                row.refund_status_at,
            )
            .map_err(corrupt)?,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

/// The refund status columns as the domain's value; an error names what is wrong.
fn stored_refund_status(
    status: Option<&str>,
    reason: Option<String>,
    at: Option<DateTime<Utc>>,
) -> Result<Option<RefundStatus>, String> {
    match (status, at) {
        (None, _) => Ok(None),
        (Some(status), Some(at)) => RefundStatus::from_parts(status, reason, at)
            .map(Some)
            .ok_or_else(|| format!("unknown refund status `{status}`")),
        (Some(status), None) => Err(format!("refund status `{status}` without its time")),
    }
}

/// The orders of a batch and whether each already has its one refund, in
/// one round trip: what the refund side checks before any money moves.
/// Orders that do not exist are simply absent.
pub async fn find_many_with_refund(
    conn: &mut AsyncPgConnection,
    ids: &[OrderId],
) -> Result<HashMap<OrderId, (Order, bool)>, StoreError> {
    let uuids: Vec<Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
    let rows = orders::table
        .filter(orders::id.eq_any(&uuids))
        .select((
            OrderRow::as_select(),
            diesel::dsl::exists(refunds::table.filter(refunds::order_id.eq(orders::id))),
        ))
        .load::<(OrderRow, bool)>(conn)
        .await
        .map_err(StoreError::classify)?;
    rows.into_iter()
        .map(|(row, refunded)| Order::try_from(row).map(|order| (order.id, (order, refunded))))
        .collect::<Result<_, _>>()
        .map_err(StoreError::Query)
}

/// Why a state change on an order did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ChangeOrderError<R> {
    #[error("order {0} not found")]
    NotFound(OrderId),
    #[error(transparent)]
    Refused(R),
    /// Other writers changed the order between each read and write.
    #[error("order {0} kept changing while this change was decided; try again")]
    Contended(OrderId),
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

/// The order to change, or why there is none.
async fn read<R>(conn: &mut AsyncPgConnection, id: OrderId) -> Result<Order, ChangeOrderError<R>> {
    find(conn, id).await?.ok_or(ChangeOrderError::NotFound(id))
}

/// Writes what an order change touches (state, shipping address, version,
/// updated_at: never the refund status, which is not the order's own and
/// moves without the version, so a stale read cannot undo it) and inserts
/// `event`, in one statement (atomic by itself, so P1 holds without
/// BEGIN/COMMIT; the relay of this process is woken after it), if the
/// order is still at `read_version`. Returns whether it was.
async fn write_with_event(
    conn: &mut AsyncPgConnection,
    order: &Order,
    read_version: i64,
    event: &EventRecord,
    correlation_id: Option<&str>,
) -> QueryResult<bool> {
    use diesel::sql_types::{BigInt, Integer, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
    let inserted = prepared_sql(
        "WITH changed AS ( \
             UPDATE orders SET state = $2, version = $3, updated_at = $4, shipping_address = $15 \
             WHERE id = $1 AND version = $5 \
             RETURNING id \
         ) \
         INSERT INTO outbox (event_id, event_type, event_version, aggregate_type, \
                             aggregate_id, aggregate_version, payload, correlation_id, \
                             occurred_at, publisher) \
         SELECT $6, $7, $8, $9, $10, $11, $12, $13, $14, $16 FROM changed",
    )
    .bind::<SqlUuid, _>(order.id.as_uuid())
    .bind::<Text, _>(order.state.as_str())
    .bind::<BigInt, _>(order.version)
    .bind::<Timestamptz, _>(order.updated_at)
    .bind::<BigInt, _>(read_version)
    .bind::<SqlUuid, _>(event.event_id.as_uuid())
    .bind::<Text, _>(event.event_type)
    .bind::<Integer, _>(event.event_version)
    .bind::<Text, _>(event.aggregate_type)
    .bind::<Text, _>(&event.aggregate_id)
    .bind::<BigInt, _>(event.aggregate_version)
    .bind::<Jsonb, _>(&event.payload)
    .bind::<Nullable<Text>, _>(correlation_id)
    .bind::<Timestamptz, _>(event.occurred_at)
    .bind::<Nullable<Text>, _>(order.shipping_address.as_ref().map(ShippingAddress::as_str))
    .bind::<Text, _>(event.publisher.as_str())
    .execute(conn)
    .await?;
    if inserted == 1 {
        // One statement, so committed by now (unless a caller wrapped it in
        // a transaction: then the relay's poll finds the row).
        crate::outbox::wake::rows_committed(event.publisher);
    }
    Ok(inserted == 1)
}

/// Writes what a state change touches, as [`write_with_event`] does, if the
/// order is still at `read_version`. Returns whether it was.
async fn write(
    conn: &mut AsyncPgConnection,
    order: &Order,
    read_version: i64,
) -> QueryResult<bool> {
    let updated = diesel::update(
        orders::table
            .find(order.id.as_uuid())
            .filter(orders::version.eq(read_version)),
    )
    .set((
        orders::state.eq(order.state.as_str()),
        orders::version.eq(order.version),
        orders::updated_at.eq(order.updated_at),
    ))
    .execute(conn)
    .await?;
    Ok(updated == 1)
}

/// Cancels an order: `Order::cancel()` decides and raises `OrderCanceled`, and
/// one statement stores the change and the event, so both commit or neither
/// does (P1). Two round trips: the read and that statement. If another writer
/// changed the order in between, the domain decides again on a fresh read, so
/// a concurrent cancel or ship makes this one refused, never a second event.
/// Nothing here talks to the broker; the relay publishes after commit.
pub async fn cancel(
    conn: &mut AsyncPgConnection,
    id: OrderId,
    correlation_id: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(Order, EventId), ChangeOrderError<CancelError>> {
    for _ in 0..CHANGE_ATTEMPTS {
        let mut order = read(conn, id).await?;
        let read_version = order.version;
        let event = order.cancel(now).map_err(ChangeOrderError::Refused)?;
        let record = event
            .to_record()
            .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
        if write_with_event(conn, &order, read_version, &record, correlation_id).await? {
            return Ok((order, event.event_id));
        }
    }
    Err(ChangeOrderError::Contended(id))
}

/// Changes an order's shipping address: `Order::change_shipping_info()`
/// decides and raises `ShippingInfoChanged`, stored with the change in the
/// same one statement as [`cancel`], with the same optimistic check. The
/// event id is `None` when the address was already that one (nothing written).
pub async fn change_shipping_info(
    conn: &mut AsyncPgConnection,
    id: OrderId,
    address: &ShippingAddress,
    correlation_id: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(Order, Option<EventId>), ChangeOrderError<ShippingInfoError>> {
    for _ in 0..CHANGE_ATTEMPTS {
        let mut order = read(conn, id).await?;
        let read_version = order.version;
        let Some(event) = order
            .change_shipping_info(address.clone(), now)
            .map_err(ChangeOrderError::Refused)?
        else {
            return Ok((order, None));
        };
        let record = event
            .to_record()
            .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
        if write_with_event(conn, &order, read_version, &record, correlation_id).await? {
            return Ok((order, Some(event.event_id)));
        }
    }
    Err(ChangeOrderError::Contended(id))
}

/// Marks an order shipped (no event yet: nothing consumes shipping in this
/// version), with the same optimistic check as [`cancel`].
pub async fn ship(
    conn: &mut AsyncPgConnection,
    id: OrderId,
    now: DateTime<Utc>,
) -> Result<Order, ChangeOrderError<ShipError>> {
    for _ in 0..CHANGE_ATTEMPTS {
        let mut order = read(conn, id).await?;
        let read_version = order.version;
        order.ship(now).map_err(ChangeOrderError::Refused)?;
        if write(conn, &order, read_version).await? {
            return Ok(order);
        }
    }
    Err(ChangeOrderError::Contended(id))
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

/// One report of the refund context about an order's refund, as the order
/// service's `orders.refund-status` worker received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundReport {
    pub message_id: Uuid,
    pub order_id: OrderId,
    pub status: RefundStatus,
}

/// An order's id and its refund status columns, as read for update.
type StoredRefundStatus = (Uuid, Option<String>, Option<String>, Option<DateTime<Utc>>);

/// What recording one report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportRecorded {
    /// The order's refund status changed.
    Changed,
    /// The order already had this status or one that wins over it
    /// ([`RefundStatus::converge`]); recorded as processed.
    Unchanged,
    /// Another delivery of the same message committed first.
    AlreadyProcessed,
    /// No such order: nothing was written, not even the inbox row.
    UnknownOrder,
}

/// Records a batch of refund reports on their orders and their inbox rows, in
/// one transaction. The orders are read and locked first (in id order, so two
/// workers cannot deadlock), each report is folded in by the domain's
/// convergence rule in batch order, and only the orders whose status changed
/// are written. The refund status moves without the order's version: it is
/// the refund context's fact, not an order change.
pub async fn record_refund_reports_with_inbox(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    reports: &[RefundReport],
) -> Result<Vec<ReportRecorded>, StoreError> {
    conn.transaction(async |conn| {
        let ids: Vec<Uuid> = reports.iter().map(|r| r.order_id.as_uuid()).collect();
        let rows: Vec<StoredRefundStatus> = orders::table
            .filter(orders::id.eq_any(&ids))
            .order(orders::id)
            .select((
                orders::id,
                orders::refund_status,
                orders::refund_failure_reason,
                orders::refund_status_at,
            ))
            .for_update()
            .load(conn)
            .await?;
        let mut held: HashMap<Uuid, Option<RefundStatus>> = HashMap::new();
        for (id, status, reason, at) in rows {
            let status = stored_refund_status(status.as_deref(), reason, at).map_err(|what| {
                diesel::result::Error::DeserializationError(format!("order {id}: {what}").into())
            })?;
            held.insert(id, status);
        }
        let known: Vec<Uuid> = reports
            .iter()
            .filter(|r| held.contains_key(&r.order_id.as_uuid()))
            .map(|r| r.message_id)
            .collect();
        let new = inbox::record_many(conn, consumer, &known).await?;
        let mut changed = HashSet::new();
        let mut recorded = Vec::with_capacity(reports.len());
        for report in reports {
            let order = report.order_id.as_uuid();
            let Some(status) = held.get_mut(&order) else {
                recorded.push(ReportRecorded::UnknownOrder);
                continue;
            };
            if !new.contains(&report.message_id) {
                recorded.push(ReportRecorded::AlreadyProcessed);
                continue;
            }
            match RefundStatus::converge(status.as_ref(), report.status.clone()) {
                Some(next) => {
                    *status = Some(next);
                    changed.insert(order);
                    recorded.push(ReportRecorded::Changed);
                }
                None => recorded.push(ReportRecorded::Unchanged),
            }
        }
        let statuses: Vec<(Uuid, RefundStatus)> = changed
            .into_iter()
            .filter_map(|order| Some((order, held.get(&order).cloned().flatten()?)))
            .collect();
        write_refund_statuses(conn, &statuses).await?;
        Ok(recorded)
    })
    .await
    .map_err(StoreError::classify)
}

/// Sets the refund status of each order in one statement (arrays, so it is
/// prepared once for every batch size).
async fn write_refund_statuses(
    conn: &mut AsyncPgConnection,
    statuses: &[(Uuid, RefundStatus)],
) -> QueryResult<()> {
    use diesel::sql_types::{Array, Nullable, Text, Timestamptz, Uuid as SqlUuid};
    if statuses.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = statuses.iter().map(|(id, _)| *id).collect();
    let names: Vec<&str> = statuses.iter().map(|(_, s)| s.as_str()).collect();
    let reasons: Vec<Option<&str>> = statuses.iter().map(|(_, s)| s.reason()).collect();
    let at: Vec<DateTime<Utc>> = statuses.iter().map(|(_, s)| s.at()).collect();
    prepared_sql(
        "UPDATE orders o SET refund_status = s.status, refund_failure_reason = s.reason, \
                             refund_status_at = s.at \
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[]) \
             AS s(id, status, reason, at) \
         WHERE o.id = s.id",
    )
    .bind::<Array<SqlUuid>, _>(&ids)
    .bind::<Array<Text>, _>(&names)
    .bind::<Array<Nullable<Text>>, _>(&reasons)
    .bind::<Array<Timestamptz>, _>(&at)
    .execute(conn)
    .await
    .map(drop)
}

/// How many of `order_ids` have each refund status (`none`: no status yet).
pub async fn count_by_refund_status(
    conn: &mut AsyncPgConnection,
    order_ids: &[Uuid],
) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
    let rows: Vec<(Option<String>, i64)> = orders::table
        .filter(orders::id.eq_any(order_ids))
        .group_by(orders::refund_status)
        .select((orders::refund_status, diesel::dsl::count_star()))
        .load(conn)
        .await
        .map_err(StoreError::classify)?;
    Ok(rows
        .into_iter()
        .map(|(status, n)| (status.unwrap_or_else(|| "none".to_owned()), n))
        .collect())
}
