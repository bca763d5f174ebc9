//! The tables of the example pull reader (the `pull-consumer` binary), not
//! courier's own: a reader in another system keeps its offset in its own
//! database, next to what it did with the events, and commits both together,
//! so that after a crash it resumes exactly where its last commit left off.
//! It creates its tables itself (`event_reader_offsets`, `event_reader_log`).

use diesel::{
    QueryableByName,
    sql_types::{Text, Uuid as SqlUuid},
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::StoreError;

/// Creates the reader's tables if they are not there yet.
pub async fn ensure_tables(conn: &mut AsyncPgConnection) -> Result<(), StoreError> {
    for ddl in [
        "CREATE TABLE IF NOT EXISTS event_reader_offsets ( \
             reader     text        PRIMARY KEY, \
             after      text        NOT NULL, \
             updated_at timestamptz NOT NULL DEFAULT now())",
        // What the example does with each event: it keeps a copy. The key
        // makes applying an event twice an error rather than a silent double.
        "CREATE TABLE IF NOT EXISTS event_reader_log ( \
             seq        bigserial   NOT NULL, \
             reader     text        NOT NULL, \
             event_id   uuid        NOT NULL, \
             position   text        NOT NULL, \
             event_type text        NOT NULL, \
             PRIMARY KEY (reader, event_id))",
    ] {
        diesel::sql_query(ddl)
            .execute(conn)
            .await
            .map_err(StoreError::classify)?;
    }
    Ok(())
}

#[derive(QueryableByName)]
struct Offset {
    #[diesel(sql_type = Text)]
    after: String,
}

/// Where `reader` stopped: the offset of the last event it applied.
pub async fn offset(
    conn: &mut AsyncPgConnection,
    reader: &str,
) -> Result<Option<String>, StoreError> {
    use diesel::OptionalExtension;
    diesel::sql_query("SELECT after FROM event_reader_offsets WHERE reader = $1")
        .bind::<Text, _>(reader)
        .get_result::<Offset>(conn)
        .await
        .optional()
        .map(|row| row.map(|r| r.after))
        .map_err(StoreError::classify)
}

/// One event as the reader applies it.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct LoggedEvent {
    #[diesel(sql_type = SqlUuid)]
    pub event_id: Uuid,
    #[diesel(sql_type = Text)]
    pub position: String,
    #[diesel(sql_type = Text)]
    pub event_type: String,
}

/// Applies `events` and moves `reader`'s offset to `after`, in one transaction.
pub async fn apply(
    conn: &mut AsyncPgConnection,
    reader: &str,
    events: &[LoggedEvent],
    after: &str,
) -> Result<(), StoreError> {
    conn.transaction(async |conn| {
        for event in events {
            diesel::sql_query(
                "INSERT INTO event_reader_log (reader, event_id, position, event_type) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind::<Text, _>(reader)
            .bind::<SqlUuid, _>(event.event_id)
            .bind::<Text, _>(&event.position)
            .bind::<Text, _>(&event.event_type)
            .execute(conn)
            .await?;
        }
        diesel::sql_query(
            "INSERT INTO event_reader_offsets (reader, after) VALUES ($1, $2) \
             ON CONFLICT (reader) DO UPDATE SET after = excluded.after, updated_at = now()",
        )
        .bind::<Text, _>(reader)
        .bind::<Text, _>(after)
        .execute(conn)
        .await
        .map(drop)
    })
    .await
    .map_err(StoreError::classify)
}

/// What `reader` applied, in the order it applied it.
pub async fn log(
    conn: &mut AsyncPgConnection,
    reader: &str,
) -> Result<Vec<LoggedEvent>, StoreError> {
    diesel::sql_query(
        "SELECT event_id, position, event_type FROM event_reader_log \
         WHERE reader = $1 ORDER BY seq",
    )
    .bind::<Text, _>(reader)
    .load(conn)
    .await
    .map_err(StoreError::classify)
}
