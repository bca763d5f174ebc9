//! The `outbox` table: the relay's claim / mark-published / record-failure
//! statements, the refund context's event inserts, and lookups. Each row
//! belongs to one publisher (`orders` or `refunds`), whose relay alone
//! publishes it. Events are inserted in the transaction of the change they
//! describe, so that both commit or neither does: the order service's by
//! the one statement that changes the order (`orders.rs`), the refund
//! context's in the transaction that records the refund (`refunds.rs`), or
//! on their own when they record nothing else (a refund given up on).
//! Reading the outbox as an event store, and pruning it, is `event_store.rs`.

use chrono::{DateTime, Utc};
use diesel::{
    prelude::*,
    sql_types::{Array, BigInt, Integer, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{
    StoreError,
    prepared::{Bound, prepared_sql},
    schema::outbox,
};
use crate::domain::{EventRecord, Publisher};

/// A stored event as the relay publishes it.
#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = outbox)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub event_version: i32,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub aggregate_version: i64,
    pub content_type: String,
    pub payload: serde_json::Value,
    pub correlation_id: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub next_attempt_at: DateTime<Utc>,
}

/// `publisher`'s oldest pending rows that are due, in id order, leaving out
/// the rows `held` (by a relay step that has not finished, or waiting in the
/// relay's hand-off).
pub async fn due(
    conn: &mut AsyncPgConnection,
    publisher: Publisher,
    limit: i64,
    held: &[i64],
) -> Result<Vec<OutboxRow>, StoreError> {
    outbox::table
        .filter(outbox::published_at.is_null())
        .filter(outbox::publisher.eq(publisher.as_str()))
        .filter(outbox::next_attempt_at.le(diesel::dsl::now))
        .filter(outbox::id.ne_all(held))
        .order(outbox::id)
        .limit(limit)
        .select(OutboxRow::as_select())
        .load(conn)
        .await
        .map_err(StoreError::classify)
}

/// Stores events, each under its record's publisher, in one statement. An
/// event whose id is stored already is left as it is: an event raised again
/// by a redelivery (its id derived from the redelivered message) is stored
/// once. Returns how many were new. The events travel as arrays, so the
/// statement is the same for every batch size and is prepared once.
pub async fn insert(
    conn: &mut AsyncPgConnection,
    events: &[(&EventRecord, Option<&str>)],
) -> QueryResult<usize> {
    if events.is_empty() {
        return Ok(0);
    }
    let e = EventColumns::of(events.iter().copied());
    e.bind_onto(prepared_sql(
        "INSERT INTO outbox (event_id, publisher, event_type, event_version, aggregate_type, \
                             aggregate_id, aggregate_version, payload, correlation_id, \
                             occurred_at) \
         SELECT e.event_id, e.publisher, e.event_type, e.event_version, e.aggregate_type, \
                e.aggregate_id, e.aggregate_version, e.payload, e.correlation_id, \
                e.occurred_at \
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::text[], $6::text[], \
                     $7::bigint[], $8::jsonb[], $9::text[], $10::timestamptz[]) \
             WITH ORDINALITY AS e(event_id, publisher, event_type, event_version, \
                                  aggregate_type, aggregate_id, aggregate_version, payload, \
                                  correlation_id, occurred_at, n) \
         ORDER BY e.n \
         ON CONFLICT (event_id) DO NOTHING",
    ))
    .execute(conn)
    .await
}

/// [`insert`] as a statement of its own, outside any transaction, so it is
/// committed when it returns: the relays of this process that publish the
/// new events are woken ([`crate::outbox::wake`]), as every other store
/// function that commits outbox rows does.
pub async fn insert_committed(
    conn: &mut AsyncPgConnection,
    events: &[(&EventRecord, Option<&str>)],
) -> QueryResult<usize> {
    let inserted = insert(conn, events).await?;
    if inserted > 0 {
        for publisher in Publisher::ALL {
            if events.iter().any(|(e, _)| e.publisher == publisher) {
                crate::outbox::wake::rows_committed(publisher);
            }
        }
    }
    Ok(inserted)
}

/// A statement with an [`EventColumns`] bound as its next ten parameters.
pub(super) type WithEvents<'b, 'a, Q> = Bound<
    Bound<
        Bound<
            Bound<
                Bound<
                    Bound<
                        Bound<
                            Bound<
                                Bound<
                                    Bound<Q, &'b Vec<Uuid>, Array<SqlUuid>>,
                                    &'b Vec<&'static str>,
                                    Array<Text>,
                                >,
                                &'b Vec<&'static str>,
                                Array<Text>,
                            >,
                            &'b Vec<i32>,
                            Array<Integer>,
                        >,
                        &'b Vec<&'static str>,
                        Array<Text>,
                    >,
                    &'b Vec<&'a str>,
                    Array<Text>,
                >,
                &'b Vec<i64>,
                Array<BigInt>,
            >,
            &'b Vec<&'a serde_json::Value>,
            Array<Jsonb>,
        >,
        &'b Vec<Option<&'a str>>,
        Array<Nullable<Text>>,
    >,
    &'b Vec<DateTime<Utc>>,
    Array<Timestamptz>,
>;

/// The outbox columns of a batch of events, one array per column, in the
/// events' order: what an `INSERT … SELECT … FROM unnest(…)` binds, so that
/// the statement's text is the same for every batch size.
pub(super) struct EventColumns<'a> {
    pub event_ids: Vec<Uuid>,
    pub publishers: Vec<&'static str>,
    pub event_types: Vec<&'static str>,
    pub event_versions: Vec<i32>,
    pub aggregate_types: Vec<&'static str>,
    pub aggregate_ids: Vec<&'a str>,
    pub aggregate_versions: Vec<i64>,
    pub payloads: Vec<&'a serde_json::Value>,
    pub correlation_ids: Vec<Option<&'a str>>,
    pub occurred_at: Vec<DateTime<Utc>>,
}

impl<'a> EventColumns<'a> {
    /// Binds the columns onto `query` as its next ten parameters, in this
    /// order: event_id, publisher, event_type, event_version,
    /// aggregate_type, aggregate_id, aggregate_version, payload,
    /// correlation_id, occurred_at.
    pub(super) fn bind_onto<'b, Q>(&'b self, query: Q) -> WithEvents<'b, 'a, Q> {
        Bound::new(query, &self.event_ids)
            .bind::<Array<Text>, _>(&self.publishers)
            .bind::<Array<Text>, _>(&self.event_types)
            .bind::<Array<Integer>, _>(&self.event_versions)
            .bind::<Array<Text>, _>(&self.aggregate_types)
            .bind::<Array<Text>, _>(&self.aggregate_ids)
            .bind::<Array<BigInt>, _>(&self.aggregate_versions)
            .bind::<Array<Jsonb>, _>(&self.payloads)
            .bind::<Array<Nullable<Text>>, _>(&self.correlation_ids)
            .bind::<Array<Timestamptz>, _>(&self.occurred_at)
    }

    /// Each event with the correlation id it is stored under.
    pub(super) fn of(
        events: impl ExactSizeIterator<Item = (&'a EventRecord, Option<&'a str>)>,
    ) -> Self {
        let n = events.len();
        let mut columns = Self {
            event_ids: Vec::with_capacity(n),
            publishers: Vec::with_capacity(n),
            event_types: Vec::with_capacity(n),
            event_versions: Vec::with_capacity(n),
            aggregate_types: Vec::with_capacity(n),
            aggregate_ids: Vec::with_capacity(n),
            aggregate_versions: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
            correlation_ids: Vec::with_capacity(n),
            occurred_at: Vec::with_capacity(n),
        };
        for (event, correlation_id) in events {
            columns.event_ids.push(event.event_id.as_uuid());
            columns.publishers.push(event.publisher.as_str());
            columns.event_types.push(event.event_type);
            columns.event_versions.push(event.event_version);
            columns.aggregate_types.push(event.aggregate_type);
            columns.aggregate_ids.push(&event.aggregate_id);
            columns.aggregate_versions.push(event.aggregate_version);
            columns.payloads.push(&event.payload);
            columns.correlation_ids.push(correlation_id);
            columns.occurred_at.push(event.occurred_at);
        }
        columns
    }
}

/// Marks rows published; only rows still pending are touched, so a row is
/// stamped once even if two relays raced on it. Raw SQL so that it is
/// prepared once ([`super::prepared`]): Diesel's `UPDATE` never is, and
/// every relay step runs this.
pub async fn mark_published(
    conn: &mut AsyncPgConnection,
    ids: &[i64],
) -> Result<usize, StoreError> {
    use diesel::sql_types::{Array, BigInt};
    if ids.is_empty() {
        return Ok(0);
    }
    prepared_sql(
        "UPDATE outbox SET published_at = now(), attempts = attempts + 1, last_error = NULL \
         WHERE id = ANY($1) AND published_at IS NULL",
    )
    .bind::<Array<BigInt>, _>(ids)
    .execute(conn)
    .await
    .map_err(StoreError::classify)
}

/// Records a failed publish: the row stays pending, with the error and when to try again.
pub async fn record_failure(
    conn: &mut AsyncPgConnection,
    id: i64,
    error: &str,
    next_attempt_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    diesel::update(
        outbox::table
            .find(id)
            .filter(outbox::published_at.is_null()),
    )
    .set((
        outbox::attempts.eq(outbox::attempts + 1),
        outbox::last_error.eq(crate::text::truncate_utf8(error, 1024)),
        outbox::next_attempt_at.eq(next_attempt_at),
    ))
    .execute(conn)
    .await
    .map_err(StoreError::classify)?;
    Ok(())
}

pub async fn find_by_event_id(
    conn: &mut AsyncPgConnection,
    event_id: Uuid,
) -> Result<Option<OutboxRow>, StoreError> {
    outbox::table
        .filter(outbox::event_id.eq(event_id))
        .select(OutboxRow::as_select())
        .first(conn)
        .await
        .optional()
        .map_err(StoreError::classify)
}

/// How many rows are still waiting for the broker.
pub async fn pending_count(conn: &mut AsyncPgConnection) -> Result<i64, StoreError> {
    outbox::table
        .filter(outbox::published_at.is_null())
        .count()
        .get_result(conn)
        .await
        .map_err(StoreError::classify)
}

/// What `courier outbox status` and the producer's `/metrics` show: how many
/// events wait for the broker, since when, and why the latest ones failed.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct OutboxStatus {
    pub pending: i64,
    /// Pending rows that failed at least once (nack, return, timeout).
    pub failing: i64,
    /// `occurred_at` of the oldest pending event.
    pub oldest_pending_at: Option<DateTime<Utc>>,
    pub published: i64,
    /// The most recently failed pending rows, newest attempt first.
    pub last_errors: Vec<PendingError>,
}

#[derive(Debug, Clone, PartialEq, Queryable, serde::Serialize)]
pub struct PendingError {
    pub event_id: Uuid,
    pub event_type: String,
    pub aggregate_id: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub next_attempt_at: DateTime<Utc>,
}

/// Pending count and the oldest pending event's time: two index-backed
/// aggregates, cheap enough for every scrape.
pub async fn pending_summary(
    conn: &mut AsyncPgConnection,
    publisher: Option<Publisher>,
) -> Result<(i64, Option<DateTime<Utc>>), StoreError> {
    let mut query = outbox::table
        .filter(outbox::published_at.is_null())
        .into_boxed();
    if let Some(publisher) = publisher {
        query = query.filter(outbox::publisher.eq(publisher.as_str()));
    }
    query
        .select((
            diesel::dsl::count_star(),
            diesel::dsl::min(outbox::occurred_at),
        ))
        .get_result(conn)
        .await
        .map_err(StoreError::classify)
}

/// The outbox's state for operators, with up to `errors` recent failures.
pub async fn status(conn: &mut AsyncPgConnection, errors: i64) -> Result<OutboxStatus, StoreError> {
    let (pending, oldest_pending_at) = pending_summary(conn, None).await?;
    let failing = outbox::table
        .filter(outbox::published_at.is_null())
        .filter(outbox::attempts.gt(0))
        .count()
        .get_result(conn)
        .await
        .map_err(StoreError::classify)?;
    let published = outbox::table
        .filter(outbox::published_at.is_not_null())
        .count()
        .get_result(conn)
        .await
        .map_err(StoreError::classify)?;
    let last_errors = outbox::table
        .filter(outbox::published_at.is_null())
        .filter(outbox::last_error.is_not_null())
        .order(outbox::next_attempt_at.desc())
        .limit(errors)
        .select((
            outbox::event_id,
            outbox::event_type,
            outbox::aggregate_id,
            outbox::attempts,
            outbox::last_error,
            outbox::next_attempt_at,
        ))
        .load(conn)
        .await
        .map_err(StoreError::classify)?;
    Ok(OutboxStatus {
        pending,
        failing,
        oldest_pending_at,
        published,
        last_errors,
    })
}
