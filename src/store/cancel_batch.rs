//! Many cancels in two round trips: one read of every order in the batch and
//! one statement that writes every change the domain allowed together with
//! its `OrderCanceled` outbox row. That statement is atomic by itself, so P1
//! holds for each order as it does in [`orders::cancel`], and the batch costs
//! the database one commit (one WAL flush) instead of one per order: under
//! load, the order service's commits were PostgreSQL's largest cost.
//!
//! `Order::cancel()` still decides every cancel. An order that another writer
//! changed between the read and the write, or that appears twice in the
//! batch, is cancelled again on its own through [`orders::cancel`], which
//! re-reads and lets the domain decide on what is there now.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use diesel::{
    prelude::*,
    sql_types::{Array, BigInt, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{
    StoreError,
    orders::{self, ChangeOrderError, OrderRow},
    outbox::{EventColumns, OutboxRow},
    prepared::prepared_sql,
    schema::orders as orders_table,
};
use crate::{
    domain::{CancelError, EventId, EventRecord, Order, OrderId},
    outbox::Handoff,
};

/// One cancel asked for, with the request id kept as the event's correlation.
#[derive(Debug, Clone)]
pub struct CancelRequest {
    pub id: OrderId,
    pub correlation_id: Option<String>,
}

/// What one cancel of a batch came to: what [`orders::cancel`] would have
/// returned for it alone.
pub type CancelOutcome = Result<(Order, EventId), ChangeOrderError<CancelError>>;

/// Cancels every order of `requests` as of `now`, one outcome per request in
/// order. An `Err` means the batch's read or write failed (a broken
/// connection, when the write's outcome is unknown, as it is for a single
/// cancel): each request must be answered with that error.
///
/// The batch's committed events go to `handoff`, the relay of this process
/// that publishes them, when there is one; otherwise the process's relays
/// are woken to claim them.
pub async fn cancel_many(
    conn: &mut AsyncPgConnection,
    requests: &[CancelRequest],
    now: DateTime<Utc>,
    handoff: Option<&Handoff>,
) -> Result<Vec<CancelOutcome>, StoreError> {
    let mut current = read_many(conn, requests).await?;
    let mut outcomes: Vec<Option<CancelOutcome>> = Vec::with_capacity(requests.len());
    let mut writes: Vec<Change> = Vec::new();
    let mut alone: Vec<usize> = Vec::new();
    let mut seen = HashSet::new();
    for (index, request) in requests.iter().enumerate() {
        if !seen.insert(request.id) {
            // The first of them decides on the stored order; this one on
            // what the first left behind, once that is written.
            alone.push(index);
            outcomes.push(None);
            continue;
        }
        let Some(order) = current.remove(&request.id) else {
            outcomes.push(Some(Err(ChangeOrderError::NotFound(request.id))));
            continue;
        };
        let mut order = order;
        let read_version = order.version;
        match order.cancel(now) {
            Err(refused) => outcomes.push(Some(Err(ChangeOrderError::Refused(refused)))),
            Ok(event) => {
                let record = event.to_record().map_err(|e| {
                    StoreError::Query(diesel::result::Error::SerializationError(Box::new(e)))
                })?;
                writes.push(Change {
                    index,
                    order,
                    read_version,
                    record,
                });
                outcomes.push(None);
            }
        }
    }
    let mut events = write_many(conn, requests, &writes).await?;
    // Ids are drawn in the batch's order: the relay publishes in id order.
    events.sort_unstable_by_key(|row| row.id);
    let written: HashSet<Uuid> = events.iter().map(|row| row.event_id).collect();
    if !events.is_empty() {
        // One statement, committed by now.
        match handoff {
            // The claims it wakes find the rows it leaves over.
            Some(handoff) => {
                handoff.hand(events);
            }
            None => crate::outbox::wake::rows_committed(crate::domain::Publisher::Orders),
        }
    }
    for change in writes {
        let event_id = change.record.event_id;
        if written.contains(&event_id.as_uuid()) {
            outcomes[change.index] = Some(Ok((change.order, event_id)));
        } else {
            alone.push(change.index);
        }
    }
    alone.sort_unstable();
    for index in alone {
        let request = &requests[index];
        // The batch's own changes are committed by now: a failure here is
        // this request's alone.
        outcomes[index] =
            Some(orders::cancel(conn, request.id, request.correlation_id.as_deref(), now).await);
    }
    Ok(outcomes
        .into_iter()
        .zip(requests)
        .map(|(outcome, request)| {
            // Every index was given its outcome above; should one be missing,
            // its caller is told the truth: nothing is known of its cancel.
            outcome.unwrap_or(Err(ChangeOrderError::Contended(request.id)))
        })
        .collect())
}

/// A change the domain allowed, waiting to be written.
struct Change {
    index: usize,
    order: Order,
    read_version: i64,
    record: EventRecord,
}

async fn read_many(
    conn: &mut AsyncPgConnection,
    requests: &[CancelRequest],
) -> Result<HashMap<OrderId, Order>, StoreError> {
    let ids: Vec<Uuid> = requests.iter().map(|r| r.id.as_uuid()).collect();
    let rows: Vec<OrderRow> = orders_table::table
        .filter(orders_table::id.eq_any(&ids))
        .select(OrderRow::as_select())
        .load(conn)
        .await
        .map_err(StoreError::classify)?;
    rows.into_iter()
        .map(|row| Order::try_from(row).map(|order| (order.id, order)))
        .collect::<Result<_, _>>()
        .map_err(StoreError::Query)
}

/// Writes every change whose order is still at the version read, with its
/// event, in one statement; returns the events written, as the relay
/// publishes them, in the batch's order. The statement's
/// text never changes with the batch's size (arrays, not a VALUES list), so
/// it is prepared once per connection.
async fn write_many(
    conn: &mut AsyncPgConnection,
    requests: &[CancelRequest],
    changes: &[Change],
) -> Result<Vec<OutboxRow>, StoreError> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = changes.iter().map(|c| c.order.id.as_uuid()).collect();
    let states: Vec<&str> = changes.iter().map(|c| c.order.state.as_str()).collect();
    let versions: Vec<i64> = changes.iter().map(|c| c.order.version).collect();
    let updated_at: Vec<DateTime<Utc>> = changes.iter().map(|c| c.order.updated_at).collect();
    let read_versions: Vec<i64> = changes.iter().map(|c| c.read_version).collect();
    let e = EventColumns::of(
        changes
            .iter()
            .map(|c| (&c.record, requests[c.index].correlation_id.as_deref())),
    );
    // $1..$5 bound here; $6..$15 are the events, bound by `bind_onto`.
    let statement = prepared_sql(
        "WITH input AS ( \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::timestamptz[], \
                                  $5::bigint[], $6::uuid[], $7::text[], $8::text[], $9::int[], \
                                  $10::text[], $11::text[], $12::bigint[], $13::jsonb[], \
                                  $14::text[], $15::timestamptz[]) \
                 WITH ORDINALITY AS i(id, state, version, updated_at, read_version, event_id, \
                                      publisher, event_type, event_version, aggregate_type, \
                                      aggregate_id, aggregate_version, payload, correlation_id, \
                                      occurred_at, n) \
         ), changed AS ( \
             UPDATE orders o SET state = i.state, version = i.version, updated_at = i.updated_at \
             FROM input i WHERE o.id = i.id AND o.version = i.read_version \
             RETURNING o.id \
         ) \
         INSERT INTO outbox (event_id, event_type, event_version, aggregate_type, aggregate_id, \
                             aggregate_version, payload, correlation_id, occurred_at, publisher) \
         SELECT i.event_id, i.event_type, i.event_version, i.aggregate_type, i.aggregate_id, \
                i.aggregate_version, i.payload, i.correlation_id, i.occurred_at, i.publisher \
         FROM input i JOIN changed c ON c.id = i.id \
         ORDER BY i.n \
         RETURNING id, event_id, event_type, event_version, aggregate_type, aggregate_id, \
                   aggregate_version, content_type, payload, correlation_id, occurred_at, \
                   published_at, attempts, last_error, next_attempt_at",
    )
    .bind::<Array<SqlUuid>, _>(&ids)
    .bind::<Array<Text>, _>(&states)
    .bind::<Array<BigInt>, _>(&versions)
    .bind::<Array<Timestamptz>, _>(&updated_at)
    .bind::<Array<BigInt>, _>(&read_versions);
    e.bind_onto(statement)
        .load::<OutboxRow>(conn)
        .await
        .map_err(StoreError::classify)
}
