//! The `refunds` table: the refund context's record, one row per canceled order.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{StoreError, inbox, schema::refunds};

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
    refund: &RefundRow,
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

/// Writes a batch of refunds and their inbox rows, plus inbox rows for
/// messages whose order was refunded already (`inbox_only`), in one
/// transaction: three statements however large the batch. Each refund gets
/// the outcome [`record_with_inbox`] would have given it alone.
pub async fn record_batch_with_inbox(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    refunds: &[RefundRow],
    inbox_only: &[Uuid],
) -> Result<RecordedBatch, StoreError> {
    conn.transaction(async |conn| {
        let ids: Vec<Uuid> = refunds
            .iter()
            .map(|r| r.event_id)
            .chain(inbox_only.iter().copied())
            .collect();
        let new = inbox::record_many(conn, consumer, &ids).await?;
        let fresh: Vec<&RefundRow> = refunds
            .iter()
            .filter(|r| new.contains(&r.event_id))
            .collect();
        let inserted: HashSet<Uuid> = if fresh.is_empty() {
            HashSet::new()
        } else {
            diesel::insert_into(refunds::table)
                .values(fresh)
                .on_conflict(refunds::order_id)
                .do_nothing()
                .returning(refunds::event_id)
                .get_results::<Uuid>(conn)
                .await?
                .into_iter()
                .collect()
        };
        Ok(RecordedBatch {
            refunds: refunds
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
    })
    .await
    .map_err(StoreError::classify)
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
