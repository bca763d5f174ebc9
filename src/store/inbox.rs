//! The `processed_messages` table: the consumers' inbox. A row is written in
//! the same transaction as the effect it guards (P4).

use std::collections::HashSet;

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{StoreError, prepared::prepared_sql, schema::processed_messages};

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
/// ids that were new; the others were recorded by a racing duplicate. The
/// ids travel as one array, so the statement is the same for every batch
/// size and is prepared once per connection.
pub async fn record_many(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    message_ids: &[Uuid],
) -> QueryResult<HashSet<Uuid>> {
    use diesel::sql_types::{Array, Text, Uuid as SqlUuid};
    if message_ids.is_empty() {
        return Ok(HashSet::new());
    }
    prepared_sql(
        "INSERT INTO processed_messages (consumer, message_id) \
         SELECT $1, unnest($2::uuid[]) \
         ON CONFLICT DO NOTHING \
         RETURNING message_id",
    )
    .bind::<Text, _>(consumer)
    .bind::<Array<SqlUuid>, _>(message_ids)
    .load::<Recorded>(conn)
    .await
    .map(|rows| rows.into_iter().map(|r| r.message_id).collect())
}

#[derive(QueryableByName)]
struct Recorded {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    message_id: Uuid,
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
