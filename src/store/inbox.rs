//! The `processed_messages` table: the consumers' inbox. A row is written in
//! the same transaction as the effect it guards (P4).

use std::collections::HashSet;

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{StoreError, schema::processed_messages};

/// Records the message as processed. Returns `false` if it already was: the
/// caller is racing a duplicate and must roll its effect back.
pub async fn record(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    message_id: Uuid,
) -> QueryResult<bool> {
    let inserted = diesel::insert_into(processed_messages::table)
        .values((
            processed_messages::consumer.eq(consumer),
            processed_messages::message_id.eq(message_id),
        ))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(inserted == 1)
}

/// Which of `message_ids` this consumer has processed already: one query
/// for a whole batch.
pub async fn seen_among(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    message_ids: &[Uuid],
) -> Result<HashSet<Uuid>, StoreError> {
    if message_ids.is_empty() {
        return Ok(HashSet::new());
    }
    processed_messages::table
        .filter(processed_messages::consumer.eq(consumer))
        .filter(processed_messages::message_id.eq_any(message_ids))
        .select(processed_messages::message_id)
        .load::<Uuid>(conn)
        .await
        .map(|ids| ids.into_iter().collect())
        .map_err(StoreError::classify)
}

/// Records a batch of messages as processed in one statement and returns the
/// ids that were new; the others were recorded by a racing duplicate.
pub async fn record_many(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    message_ids: &[Uuid],
) -> QueryResult<HashSet<Uuid>> {
    if message_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let rows: Vec<_> = message_ids
        .iter()
        .map(|id| {
            (
                processed_messages::consumer.eq(consumer),
                processed_messages::message_id.eq(*id),
            )
        })
        .collect();
    diesel::insert_into(processed_messages::table)
        .values(rows)
        .on_conflict_do_nothing()
        .returning(processed_messages::message_id)
        .get_results::<Uuid>(conn)
        .await
        .map(|ids| ids.into_iter().collect())
}

pub async fn count(conn: &mut AsyncPgConnection, consumer: &str) -> Result<i64, StoreError> {
    processed_messages::table
        .filter(processed_messages::consumer.eq(consumer))
        .count()
        .get_result(conn)
        .await
        .map_err(StoreError::classify)
}

/// How many of `message_ids` this consumer has processed.
pub async fn count_among(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    message_ids: &[Uuid],
) -> Result<i64, StoreError> {
    processed_messages::table
        .filter(processed_messages::consumer.eq(consumer))
        .filter(processed_messages::message_id.eq_any(message_ids))
        .count()
        .get_result(conn)
        .await
        .map_err(StoreError::classify)
}
