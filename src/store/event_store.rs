//! The outbox read as an event store (`outbox` and `outbox_pruned`): one
//! publisher's events in commit order for pull readers, and the pruning of
//! their oldest published part.
//!
//! Why commit order and not id order: an id is drawn when a row is inserted,
//! not when its transaction commits, so a row with a smaller id can become
//! visible after a larger one. A reader that resumed "after id N" would skip
//! it for good. Rows are therefore read in `(tx_id, id)` order (`tx_id` is
//! the writing transaction's id), and only rows whose transaction is older
//! than every transaction still running (`pg_snapshot_xmin`): those are all
//! final, and every row that commits later sorts after them. A reader's
//! position is that pair ([`StreamPosition`]).
//!
//! Pruning removes a prefix of the same order, so what is left is still the
//! stream from some position on, and records where it stopped: a reader
//! behind that point learns it ([`Page::Pruned`]) instead of being handed a
//! history with a hole in it.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Integer, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::StoreError;
use crate::domain::Publisher;

/// A place in one publisher's stream: just after the event with this
/// transaction id and row id. Written `<tx_id>.<id>`; `0.0` is the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, QueryableByName)]
pub struct StreamPosition {
    #[diesel(sql_type = BigInt)]
    pub tx_id: i64,
    #[diesel(sql_type = BigInt)]
    pub id: i64,
}

impl StreamPosition {
    pub const START: Self = Self { tx_id: 0, id: 0 };
}

impl fmt::Display for StreamPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.tx_id, self.id)
    }
}

/// Why an offset could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "offset `{0}` is not of the form <tx_id>.<id> (two non-negative integers), as the `offset` of an event reads"
)]
pub struct BadPosition(pub String);

impl FromStr for StreamPosition {
    type Err = BadPosition;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let bad = || BadPosition(raw.chars().take(64).collect());
        let (tx_id, id) = raw.split_once('.').ok_or_else(bad)?;
        let number = |part: &str| {
            part.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0 && part.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(bad)
        };
        Ok(Self {
            tx_id: number(tx_id)?,
            id: number(id)?,
        })
    }
}

/// One event as the event store serves it.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct StoredEvent {
    #[diesel(sql_type = BigInt)]
    pub tx_id: i64,
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = SqlUuid)]
    pub event_id: Uuid,
    #[diesel(sql_type = Text)]
    pub event_type: String,
    #[diesel(sql_type = Integer)]
    pub event_version: i32,
    #[diesel(sql_type = Text)]
    pub aggregate_type: String,
    #[diesel(sql_type = Text)]
    pub aggregate_id: String,
    #[diesel(sql_type = BigInt)]
    pub aggregate_version: i64,
    #[diesel(sql_type = Timestamptz)]
    pub occurred_at: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    pub content_type: String,
    #[diesel(sql_type = Jsonb)]
    pub payload: serde_json::Value,
    #[diesel(sql_type = Nullable<Text>)]
    pub correlation_id: Option<String>,
}

impl StoredEvent {
    pub fn position(&self) -> StreamPosition {
        StreamPosition {
            tx_id: self.tx_id,
            id: self.id,
        }
    }
}

/// What a read of the stream found.
#[derive(Debug, Clone, PartialEq)]
pub enum Page {
    /// The events after the position, in commit order (none: caught up).
    Events(Vec<StoredEvent>),
    /// The position is behind what was pruned: the events between it and
    /// `through` are gone. `oldest` is the first event still kept, if any.
    Pruned {
        through: StreamPosition,
        oldest: Option<StreamPosition>,
    },
}

/// The columns every read returns, in [`StoredEvent`]'s shape.
const EVENT_COLUMNS: &str = "(tx_id::text)::bigint AS tx_id, id, event_id, event_type, \
     event_version, aggregate_type, aggregate_id, aggregate_version, occurred_at, \
     content_type, payload, correlation_id";

/// Rows whose transaction is older than every one still running: final.
const SETTLED: &str = "tx_id < pg_snapshot_xmin(pg_current_snapshot())";

/// Up to `limit` of `publisher`'s events after `after`, in commit order, or
/// [`Page::Pruned`] if `after` is behind the pruned part. Read in one
/// repeatable-read snapshot, so a prune running at the same time cannot slip
/// between the check and the read.
pub async fn read(
    conn: &mut AsyncPgConnection,
    publisher: Publisher,
    after: StreamPosition,
    limit: i64,
) -> Result<Page, StoreError> {
    conn.build_transaction()
        .read_only()
        .repeatable_read()
        .run(async |conn| {
            if let Some(through) = pruned_through(conn, publisher).await?
                && after < through
            {
                let oldest = events_after(conn, publisher, through, 1)
                    .await?
                    .into_iter()
                    .next()
                    .map(|event| event.position());
                return Ok(Page::Pruned { through, oldest });
            }
            events_after(conn, publisher, after, limit)
                .await
                .map(Page::Events)
        })
        .await
        .map_err(StoreError::classify)
}

async fn events_after(
    conn: &mut AsyncPgConnection,
    publisher: Publisher,
    after: StreamPosition,
    limit: i64,
) -> diesel::QueryResult<Vec<StoredEvent>> {
    diesel::sql_query(format!(
        "SELECT {EVENT_COLUMNS} FROM outbox \
         WHERE publisher = $1 AND (tx_id, id) > (($2::bigint)::text::xid8, $3) AND {SETTLED} \
         ORDER BY tx_id, id LIMIT $4"
    ))
    .bind::<Text, _>(publisher.as_str())
    .bind::<BigInt, _>(after.tx_id)
    .bind::<BigInt, _>(after.id)
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await
}

/// Where `publisher`'s pruning stopped: everything up to and including it is
/// gone. `None` if it was never pruned.
pub async fn pruned_through(
    conn: &mut AsyncPgConnection,
    publisher: Publisher,
) -> diesel::QueryResult<Option<StreamPosition>> {
    use diesel::OptionalExtension;
    diesel::sql_query(
        "SELECT (tx_id::text)::bigint AS tx_id, id FROM outbox_pruned WHERE publisher = $1",
    )
    .bind::<Text, _>(publisher.as_str())
    .get_result(conn)
    .await
    .optional()
}

/// What one prune batch removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub rows: usize,
    /// The new end of the pruned part.
    pub through: StreamPosition,
}

/// Removes, in one transaction, up to `batch` of `publisher`'s oldest events
/// that were published before `cutoff`, and moves the pruned mark past them.
/// Only a prefix of the stream goes: it stops at the first event that is
/// not yet published, not old enough, or not yet settled, so the rest is
/// still the whole stream from the mark on. `None` when nothing qualifies.
pub async fn prune_batch(
    conn: &mut AsyncPgConnection,
    publisher: Publisher,
    cutoff: DateTime<Utc>,
    batch: i64,
) -> Result<Option<Pruned>, StoreError> {
    conn.transaction(async |conn| {
        let removed: Vec<StreamPosition> = diesel::sql_query(format!(
            "WITH oldest AS ( \
                 SELECT id, tx_id, \
                        (published_at IS NOT NULL AND published_at < $2 AND {SETTLED}) AS prunable \
                 FROM outbox WHERE publisher = $1 ORDER BY tx_id, id LIMIT $3 \
             ), stop AS ( \
                 SELECT tx_id, id FROM oldest WHERE NOT prunable ORDER BY tx_id, id LIMIT 1 \
             ) \
             DELETE FROM outbox WHERE id IN ( \
                 SELECT id FROM oldest \
                 WHERE NOT EXISTS (SELECT 1 FROM stop WHERE (stop.tx_id, stop.id) <= (oldest.tx_id, oldest.id)) \
             ) \
             RETURNING (tx_id::text)::bigint AS tx_id, id"
        ))
        .bind::<Text, _>(publisher.as_str())
        .bind::<Timestamptz, _>(cutoff)
        .bind::<BigInt, _>(batch)
        .load(conn)
        .await?;
        let Some(through) = removed.iter().max().copied() else {
            return Ok(None);
        };
        let rows = removed.len();
        diesel::sql_query(
            "INSERT INTO outbox_pruned (publisher, tx_id, id, rows_pruned, pruned_at) \
             VALUES ($1, ($2::bigint)::text::xid8, $3, $4, now()) \
             ON CONFLICT (publisher) DO UPDATE SET tx_id = excluded.tx_id, id = excluded.id, \
                 rows_pruned = outbox_pruned.rows_pruned + excluded.rows_pruned, pruned_at = now()",
        )
        .bind::<Text, _>(publisher.as_str())
        .bind::<BigInt, _>(through.tx_id)
        .bind::<BigInt, _>(through.id)
        .bind::<BigInt, _>(i64::try_from(rows).unwrap_or(i64::MAX))
        .execute(conn)
        .await?;
        Ok(Some(Pruned { rows, through }))
    })
    .await
    .map_err(StoreError::classify)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_reads_back_from_its_text() {
        let position = StreamPosition { tx_id: 812, id: 77 };
        assert_eq!(position.to_string().parse(), Ok(position));
        assert_eq!("0.0".parse(), Ok(StreamPosition::START));
    }

    #[test]
    fn positions_order_by_transaction_then_id() {
        let early_tx_late_id = StreamPosition { tx_id: 5, id: 90 };
        let late_tx_early_id = StreamPosition { tx_id: 6, id: 80 };
        assert!(early_tx_late_id < late_tx_early_id);
    }

    #[test]
    fn malformed_offsets_are_refused() {
        for raw in [
            "", "12", "1.2.3", "-1.2", "1.-2", "a.b", "1.", ".1", "+1.2", " 1.2",
        ] {
            assert!(raw.parse::<StreamPosition>().is_err(), "{raw:?}");
        }
    }
}
