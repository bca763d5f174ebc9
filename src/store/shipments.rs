//! The `shipments` table: the shipping-sync worker's read model of where each
//! order ships to. A change is applied only if its order version is newer
//! than the one the row holds (P9), so the newest address wins whatever
//! order the events arrive in, duplicates and retries included.

use std::collections::HashMap;

use diesel::{prelude::*, query_dsl::methods::FilterDsl, upsert::excluded};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{StoreError, inbox, schema::shipments};

/// One `order.shipping-info-changed` to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShippingChange {
    pub message_id: Uuid,
    pub order_id: Uuid,
    pub shipping_address: String,
    pub order_version: i64,
}

/// What applying one change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The read model now holds this change.
    Applied,
    /// The read model holds this version or a newer one already: skipped.
    Stale,
    /// Another delivery of the same message committed first.
    AlreadyProcessed,
}

/// Applies a batch of changes and records their inbox rows in one
/// transaction: the inbox in one statement, then one upsert that writes a
/// row only where the change is newer. Of several changes to one order in
/// the batch only the newest is offered; the rest are stale by definition.
pub async fn apply_batch_with_inbox(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    changes: &[ShippingChange],
) -> Result<Vec<Applied>, StoreError> {
    conn.transaction(async |conn| {
        let ids: Vec<Uuid> = changes.iter().map(|c| c.message_id).collect();
        let new = inbox::record_many(conn, consumer, &ids).await?;
        // The newest new change per order, by index into `changes`.
        let mut newest: HashMap<Uuid, usize> = HashMap::new();
        for (i, change) in changes.iter().enumerate() {
            if !new.contains(&change.message_id) {
                continue;
            }
            newest
                .entry(change.order_id)
                .and_modify(|held| {
                    if changes[*held].order_version < change.order_version {
                        *held = i;
                    }
                })
                .or_insert(i);
        }
        let offered: Vec<_> = newest
            .values()
            .map(|i| {
                let change = &changes[*i];
                (
                    shipments::order_id.eq(change.order_id),
                    shipments::shipping_address.eq(&change.shipping_address),
                    shipments::applied_version.eq(change.order_version),
                )
            })
            .collect();
        let written: Vec<(Uuid, i64)> = if offered.is_empty() {
            Vec::new()
        } else {
            diesel::insert_into(shipments::table)
                .values(offered)
                .on_conflict(shipments::order_id)
                .do_update()
                .set((
                    shipments::shipping_address.eq(excluded(shipments::shipping_address)),
                    shipments::applied_version.eq(excluded(shipments::applied_version)),
                    shipments::updated_at.eq(diesel::dsl::now),
                ))
                .filter(shipments::applied_version.lt(excluded(shipments::applied_version)))
                .returning((shipments::order_id, shipments::applied_version))
                .get_results(conn)
                .await?
        };
        Ok(changes
            .iter()
            .enumerate()
            .map(|(i, change)| {
                if !new.contains(&change.message_id) {
                    Applied::AlreadyProcessed
                } else if newest.get(&change.order_id) == Some(&i)
                    && written.contains(&(change.order_id, change.order_version))
                {
                    Applied::Applied
                } else {
                    Applied::Stale
                }
            })
            .collect())
    })
    .await
    .map_err(StoreError::classify)
}

/// An order's row in the read model: its address and the version it is from.
pub async fn find(
    conn: &mut AsyncPgConnection,
    order_id: Uuid,
) -> Result<Option<(String, i64)>, StoreError> {
    shipments::table
        .find(order_id)
        .select((shipments::shipping_address, shipments::applied_version))
        .first(conn)
        .await
        .optional()
        .map_err(StoreError::classify)
}
