//! The `processed_messages` table: the consumers' inbox. A row is written in
//! the same transaction as the effect it guards (P4).

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{StoreError, schema::processed_messages};

pub async fn seen(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    message_id: Uuid,
) -> Result<bool, StoreError> {
    diesel::select(diesel::dsl::exists(
        processed_messages::table
            .filter(processed_messages::consumer.eq(consumer))
            .filter(processed_messages::message_id.eq(message_id)),
    ))
    .get_result(conn)
    .await
    .map_err(StoreError::classify)
}

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

pub async fn count(conn: &mut AsyncPgConnection, consumer: &str) -> Result<i64, StoreError> {
    processed_messages::table
        .filter(processed_messages::consumer.eq(consumer))
        .count()
        .get_result(conn)
        .await
        .map_err(StoreError::classify)
}
