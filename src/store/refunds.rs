//! The `refunds` table: the refund context's record, one row per canceled
//! order, written together with the refund context's `refund.completed`
//! outbox row.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{StoreError, outbox, prepared::prepared_sql, schema::refunds};
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
/// (`inbox_only`), in one statement however large the batch. Each refund
/// gets the outcome [`record_with_inbox`] would have given it alone, and an
/// event only if its row was written.
///
/// One statement is atomic on its own (P4 holds as in a transaction), and it
/// is one round trip where `BEGIN`, three inserts and `COMMIT` were five: on
/// a busy machine each round trip is a wait for the other process to be
/// scheduled, and this commit is on every refund's path (BENCHMARKS.md).
pub async fn record_batch_with_inbox(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    refunds: &[NewRefund],
    inbox_only: &[Uuid],
) -> Result<RecordedBatch, StoreError> {
    use diesel::sql_types::Uuid as SqlUuid;
    use diesel::sql_types::{Array, BigInt, Text, Timestamptz};
    if refunds.is_empty() && inbox_only.is_empty() {
        return Ok(RecordedBatch {
            refunds: Vec::new(),
            inbox_only: Vec::new(),
        });
    }
    let rows: Vec<&RefundRow> = refunds.iter().map(|r| &r.row).collect();
    let uuids = |f: &dyn Fn(&RefundRow) -> Uuid| rows.iter().map(|r| f(r)).collect::<Vec<_>>();
    let texts = |f: &dyn Fn(&RefundRow) -> &str| rows.iter().map(|r| f(r)).collect::<Vec<_>>();
    let times =
        |f: &dyn Fn(&RefundRow) -> DateTime<Utc>| rows.iter().map(|r| f(r)).collect::<Vec<_>>();
    // Each refund's event names the request it answers as its correlation.
    let asked_by: Vec<String> = rows.iter().map(|r| r.event_id.to_string()).collect();
    let e = outbox::EventColumns::of(
        refunds
            .iter()
            .zip(&asked_by)
            .map(|(r, asked_by)| (&r.completed, Some(asked_by.as_str()))),
    );
    let inbox_ids: Vec<Uuid> = rows
        .iter()
        .map(|r| r.event_id)
        .chain(inbox_only.iter().copied())
        .collect();
    // Every part of a statement sees the same snapshot, so each insert
    // learns what the one before it wrote from its RETURNING, never by
    // reading the table: a refund is written only if its message's inbox
    // row is new, and its event only if the refund is.
    // $1..$11 bound here; $12..$21 are the events, bound by `bind_onto`.
    let statement = prepared_sql(
        "WITH input AS ( \
             SELECT * FROM unnest($3::uuid[], $4::uuid[], $5::uuid[], $6::text[], $7::bigint[], \
                                  $8::text[], $9::text[], $10::timestamptz[], \
                                  $11::timestamptz[], $12::uuid[], $13::text[], $14::text[], \
                                  $15::int[], $16::text[], $17::text[], $18::bigint[], \
                                  $19::jsonb[], $20::text[], $21::timestamptz[]) \
                 WITH ORDINALITY AS i(id, order_id, event_id, payment_id, amount_cents, \
                                      gateway_refund_id, status, created_at, updated_at, \
                                      completed_id, publisher, event_type, event_version, \
                                      aggregate_type, aggregate_id, aggregate_version, \
                                      payload, correlation_id, occurred_at, n) \
         ), inboxed AS ( \
             INSERT INTO processed_messages (consumer, message_id) \
             SELECT $1, unnest($2::uuid[]) \
             ON CONFLICT DO NOTHING \
             RETURNING message_id \
         ), refunded AS ( \
             INSERT INTO refunds (id, order_id, event_id, payment_id, amount_cents, \
                                  gateway_refund_id, status, created_at, updated_at) \
             SELECT i.id, i.order_id, i.event_id, i.payment_id, i.amount_cents, \
                    i.gateway_refund_id, i.status, i.created_at, i.updated_at \
             FROM input i WHERE i.event_id IN (SELECT message_id FROM inboxed) \
             ORDER BY i.n \
             ON CONFLICT (order_id) DO NOTHING \
             RETURNING event_id \
         ), announced AS ( \
             INSERT INTO outbox (event_id, publisher, event_type, event_version, \
                                 aggregate_type, aggregate_id, aggregate_version, payload, \
                                 correlation_id, occurred_at) \
             SELECT i.completed_id, i.publisher, i.event_type, i.event_version, \
                    i.aggregate_type, i.aggregate_id, i.aggregate_version, i.payload, \
                    i.correlation_id, i.occurred_at \
             FROM input i JOIN refunded r ON r.event_id = i.event_id \
             ORDER BY i.n \
             ON CONFLICT (event_id) DO NOTHING \
         ) \
         SELECT message_id AS id, false AS refunded FROM inboxed \
         UNION ALL SELECT event_id, true FROM refunded",
    )
    .bind::<Text, _>(consumer)
    .bind::<Array<SqlUuid>, _>(&inbox_ids)
    .bind::<Array<SqlUuid>, _>(uuids(&|r| r.id))
    .bind::<Array<SqlUuid>, _>(uuids(&|r| r.order_id))
    .bind::<Array<SqlUuid>, _>(uuids(&|r| r.event_id))
    .bind::<Array<Text>, _>(texts(&|r| &r.payment_id))
    .bind::<Array<BigInt>, _>(rows.iter().map(|r| r.amount_cents).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(texts(&|r| &r.gateway_refund_id))
    .bind::<Array<Text>, _>(texts(&|r| &r.status))
    .bind::<Array<Timestamptz>, _>(times(&|r| r.created_at))
    .bind::<Array<Timestamptz>, _>(times(&|r| r.updated_at));
    let written: Vec<Written> = e
        .bind_onto(statement)
        .load(conn)
        .await
        .map_err(StoreError::classify)?;
    let new: HashSet<Uuid> = written
        .iter()
        .filter(|w| !w.refunded)
        .map(|w| w.id)
        .collect();
    let inserted: HashSet<Uuid> = written
        .iter()
        .filter(|w| w.refunded)
        .map(|w| w.id)
        .collect();
    if !inserted.is_empty() {
        // One statement, committed by now.
        crate::outbox::wake::rows_committed(crate::domain::Publisher::Refunds);
    }
    Ok(RecordedBatch {
        refunds: rows
            .iter()
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
}

#[derive(QueryableByName)]
struct Written {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    /// A refund row's event id; otherwise a new inbox row's message id.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    refunded: bool,
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
