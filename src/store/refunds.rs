//! The `refunds` table: the refund context's record, one row per canceled
//! order, written together with the refund context's `refund.completed`
//! outbox row.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{StoreError, inbox, outbox, schema::refunds};
use crate::domain::EventRecord;

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = refunds)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct RefundRow {
    pub id: Uuid,
    pub order_id: Uuid,
    pub event_id: Uuid,
    pub payment_id: String,
    pub amount_cents: i64,
    pub gateway_refund_id: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A refund to record, and the `refund.completed` event that announces it,
/// stored in the same transaction (and only if the refund is).
#[derive(Debug, Clone)]
pub struct NewRefund {
    pub row: RefundRow,
    pub completed: EventRecord,
}

/// What recording a refund did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    New,
    /// Another delivery of the same message committed first; nothing was written.
    AlreadyProcessed,
    /// Another message for the same order committed its refund first; only
    /// this message's inbox row was written.
    OrderAlreadyRefunded,
}

/// Writes the refund and the inbox row in one transaction (P4): a batch of
/// one. The refund is unique per order, so even a different event for the
/// same order cannot produce a second row.
pub async fn record_with_inbox(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    refund: &NewRefund,
) -> Result<Recorded, StoreError> {
    let recorded =
        record_batch_with_inbox(conn, consumer, std::slice::from_ref(refund), &[]).await?;
    Ok(recorded.refunds[0])
}

/// What recording one batch did: one [`Recorded`] per refund, in order, and
/// for each inbox-only message whether its row was new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedBatch {
    pub refunds: Vec<Recorded>,
    pub inbox_only: Vec<bool>,
}

/// Writes a batch of refunds, their `refund.completed` events and their
/// inbox rows, plus inbox rows for messages whose order was refunded already
/// (`inbox_only`), in one transaction: four statements however large the
/// batch. Each refund gets the outcome [`record_with_inbox`] would have
/// given it alone, and an event only if its row was written.
pub async fn record_batch_with_inbox(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    refunds: &[NewRefund],
    inbox_only: &[Uuid],
) -> Result<RecordedBatch, StoreError> {
    conn.transaction(async |conn| {
        let ids: Vec<Uuid> = refunds
            .iter()
            .map(|r| r.row.event_id)
            .chain(inbox_only.iter().copied())
            .collect();
        let new = inbox::record_many(conn, consumer, &ids).await?;
        let fresh: Vec<&RefundRow> = refunds
            .iter()
            .map(|r| &r.row)
            .filter(|r| new.contains(&r.event_id))
            .collect();
        let inserted = insert_fresh(conn, &fresh).await?;
        // Each refund's event names the request it answers as its correlation.
        let asked_by: Vec<String> = refunds.iter().map(|r| r.row.event_id.to_string()).collect();
        let completed: Vec<_> = refunds
            .iter()
            .zip(&asked_by)
            .filter(|(r, _)| inserted.contains(&r.row.event_id))
            .map(|(r, asked_by)| (&r.completed, Some(asked_by.as_str())))
            .collect();
        outbox::insert(conn, &completed).await?;
        Ok(RecordedBatch {
            refunds: refunds
                .iter()
                .map(|r| &r.row)
                .map(|r| {
                    if !new.contains(&r.event_id) {
                        Recorded::AlreadyProcessed
                    } else if inserted.contains(&r.event_id) {
                        Recorded::New
                    } else {
                        Recorded::OrderAlreadyRefunded
                    }
                })
                .collect(),
            inbox_only: inbox_only.iter().map(|id| new.contains(id)).collect(),
        })
    })
    .await
    .map_err(StoreError::classify)
    .inspect(|recorded| {
        if recorded.refunds.contains(&Recorded::New) {
            crate::outbox::wake::rows_committed(crate::domain::Publisher::Refunds);
        }
    })
}

#[derive(QueryableByName)]
struct Inserted {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    event_id: Uuid,
}

/// Inserts the refunds whose order has none yet and returns their event ids;
/// one statement with the rows as arrays, prepared once for every batch size.
async fn insert_fresh(
    conn: &mut AsyncPgConnection,
    fresh: &[&RefundRow],
) -> QueryResult<HashSet<Uuid>> {
    use diesel::sql_types::{Array, BigInt, Text, Timestamptz, Uuid as SqlUuid};
    if fresh.is_empty() {
        return Ok(HashSet::new());
    }
    let uuids = |f: &dyn Fn(&RefundRow) -> Uuid| fresh.iter().map(|r| f(r)).collect::<Vec<_>>();
    let texts = |f: &dyn Fn(&RefundRow) -> &str| fresh.iter().map(|r| f(r)).collect::<Vec<_>>();
    let times =
        |f: &dyn Fn(&RefundRow) -> DateTime<Utc>| fresh.iter().map(|r| f(r)).collect::<Vec<_>>();
    let amounts: Vec<i64> = fresh.iter().map(|r| r.amount_cents).collect();
    diesel::sql_query(
        "INSERT INTO refunds (id, order_id, event_id, payment_id, amount_cents, \
                              gateway_refund_id, status, created_at, updated_at) \
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::bigint[], \
                              $6::text[], $7::text[], $8::timestamptz[], $9::timestamptz[]) \
         ON CONFLICT (order_id) DO NOTHING \
         RETURNING event_id",
    )
    .bind::<Array<SqlUuid>, _>(uuids(&|r| r.id))
    .bind::<Array<SqlUuid>, _>(uuids(&|r| r.order_id))
    .bind::<Array<SqlUuid>, _>(uuids(&|r| r.event_id))
    .bind::<Array<Text>, _>(texts(&|r| &r.payment_id))
    .bind::<Array<BigInt>, _>(amounts)
    .bind::<Array<Text>, _>(texts(&|r| &r.gateway_refund_id))
    .bind::<Array<Text>, _>(texts(&|r| &r.status))
    .bind::<Array<Timestamptz>, _>(times(&|r| r.created_at))
    .bind::<Array<Timestamptz>, _>(times(&|r| r.updated_at))
    .load::<Inserted>(conn)
    .await
    .map(|rows| rows.into_iter().map(|r| r.event_id).collect())
}

pub async fn all(conn: &mut AsyncPgConnection) -> Result<Vec<RefundRow>, StoreError> {
    refunds::table
        .order(refunds::created_at)
        .select(RefundRow::as_select())
        .load(conn)
        .await
        .map_err(StoreError::classify)
}

pub async fn count(conn: &mut AsyncPgConnection) -> Result<i64, StoreError> {
    refunds::table
        .count()
        .get_result(conn)
        .await
        .map_err(StoreError::classify)
}

/// How many of `order_ids` have their refund.
pub async fn count_for_orders(
    conn: &mut AsyncPgConnection,
    order_ids: &[Uuid],
) -> Result<i64, StoreError> {
    refunds::table
        .filter(refunds::order_id.eq_any(order_ids))
        .count()
        .get_result(conn)
        .await
        .map_err(StoreError::classify)
}

/// Whether the order already has its refund recorded: what makes replaying
/// one of its dead letters harmless.
pub async fn exists_for_order(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
) -> Result<bool, StoreError> {
    diesel::select(diesel::dsl::exists(
        refunds::table.filter(refunds::order_id.eq(order_id)),
    ))
    .get_result(conn)
    .await
    .map_err(StoreError::classify)
}
