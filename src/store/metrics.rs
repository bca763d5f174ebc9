//! Read-only figures for the benchmark: PostgreSQL's own statistics views for
//! the current database, the commit-to-refund timings of a set of orders, and
//! the server's identity. Nothing here writes, and nothing here is on the
//! order or refund path.

use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Integer, Nullable, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::StoreError;

/// Cumulative counters of one database, from `pg_stat_database` and the sums
/// of `pg_stat_user_tables`. Backends report them when they go idle (at most
/// once a second), so read them a little after the load stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, QueryableByName)]
pub struct DbCounters {
    /// Committed transactions; every statement outside `BEGIN … COMMIT`
    /// (a pool's `SELECT 1`, an inbox check) is one of its own.
    #[diesel(sql_type = BigInt)]
    pub xact_commit: i64,
    #[diesel(sql_type = BigInt)]
    pub xact_rollback: i64,
    /// Sequential plus index scans started on our tables: roughly one per
    /// statement that reads or updates a table.
    #[diesel(sql_type = BigInt)]
    pub scans: i64,
    #[diesel(sql_type = BigInt)]
    pub rows_inserted: i64,
    #[diesel(sql_type = BigInt)]
    pub rows_updated: i64,
    #[diesel(sql_type = BigInt)]
    pub rows_deleted: i64,
}

impl DbCounters {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            xact_commit: self.xact_commit - earlier.xact_commit,
            xact_rollback: self.xact_rollback - earlier.xact_rollback,
            scans: self.scans - earlier.scans,
            rows_inserted: self.rows_inserted - earlier.rows_inserted,
            rows_updated: self.rows_updated - earlier.rows_updated,
            rows_deleted: self.rows_deleted - earlier.rows_deleted,
        }
    }
}

/// The counters of the database `conn` is connected to. The statement itself
/// counts as one committed transaction.
pub async fn counters(conn: &mut AsyncPgConnection) -> Result<DbCounters, StoreError> {
    diesel::sql_query(
        "SELECT d.xact_commit, d.xact_rollback, \
                COALESCE(t.scans, 0)::bigint AS scans, \
                COALESCE(t.ins, 0)::bigint AS rows_inserted, \
                COALESCE(t.upd, 0)::bigint AS rows_updated, \
                COALESCE(t.del, 0)::bigint AS rows_deleted \
         FROM pg_stat_database d, \
              (SELECT sum(COALESCE(seq_scan, 0) + COALESCE(idx_scan, 0)) AS scans, \
                      sum(n_tup_ins) AS ins, sum(n_tup_upd) AS upd, sum(n_tup_del) AS del \
               FROM pg_stat_user_tables) t \
         WHERE d.datname = current_database()",
    )
    .get_result(conn)
    .await
    .map_err(StoreError::classify)
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

/// The server processes serving connections to `database` right now.
pub async fn backend_pids(
    conn: &mut AsyncPgConnection,
    database: &str,
) -> Result<Vec<i32>, StoreError> {
    let rows: Vec<Pid> = diesel::sql_query(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid IS NOT NULL",
    )
    .bind::<Text, _>(database)
    .load(conn)
    .await
    .map_err(StoreError::classify)?;
    Ok(rows.into_iter().map(|row| row.pid).collect())
}

/// When an order's cancel happened and when its refund was recorded.
#[derive(Debug, Clone, Copy, QueryableByName)]
pub struct RefundTiming {
    /// `orders.updated_at` of the canceled order: the time the cancel
    /// transaction was given (read just before it began).
    #[diesel(sql_type = Timestamptz)]
    pub canceled_at: DateTime<Utc>,
    /// The refund inbox row's `processed_at`: PostgreSQL's `now()` in the
    /// transaction that recorded the refund.
    #[diesel(sql_type = Timestamptz)]
    pub refunded_at: DateTime<Utc>,
    /// The cancel event's `outbox.published_at`: when the relay marked it
    /// after the broker's confirm (none where there is no outbox: the peer).
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub published_at: Option<DateTime<Utc>>,
}

impl RefundTiming {
    /// Cancel to refund, ms: the pipeline's latency.
    pub fn cancel_to_refund_ms(&self) -> f64 {
        self.ms_since_cancel(self.refunded_at)
    }

    /// Cancel to the relay's mark, ms (none without an outbox).
    pub fn cancel_to_published_ms(&self) -> Option<f64> {
        self.published_at.map(|at| self.ms_since_cancel(at))
    }

    fn ms_since_cancel(&self, at: DateTime<Utc>) -> f64 {
        (at - self.canceled_at).as_seconds_f64() * 1000.0
    }
}

/// The timings of those of `order_ids` whose refund is recorded by `consumer`.
pub async fn refund_timings(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    order_ids: &[Uuid],
) -> Result<Vec<RefundTiming>, StoreError> {
    diesel::sql_query(
        "SELECT o.updated_at AS canceled_at, p.processed_at AS refunded_at, \
                e.published_at \
         FROM refunds r \
         JOIN orders o ON o.id = r.order_id \
         JOIN processed_messages p ON p.consumer = $1 AND p.message_id = r.event_id \
         LEFT JOIN outbox e ON e.event_id = r.event_id \
         WHERE r.order_id = ANY($2)",
    )
    .bind::<Text, _>(consumer)
    .bind::<Array<SqlUuid>, _>(order_ids)
    .load(conn)
    .await
    .map_err(StoreError::classify)
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// How many of `order_ids` have a refund row.
pub async fn refunded_count(
    conn: &mut AsyncPgConnection,
    order_ids: &[Uuid],
) -> Result<i64, StoreError> {
    let row: Count =
        diesel::sql_query("SELECT count(*) AS n FROM refunds WHERE order_id = ANY($1)")
            .bind::<Array<SqlUuid>, _>(order_ids)
            .get_result(conn)
            .await
            .map_err(StoreError::classify)?;
    Ok(row.n)
}

#[derive(QueryableByName)]
struct Version {
    #[diesel(sql_type = Text)]
    server_version: String,
}

pub async fn server_version(conn: &mut AsyncPgConnection) -> Result<String, StoreError> {
    let row: Version = diesel::sql_query("SHOW server_version")
        .get_result(conn)
        .await
        .map_err(StoreError::classify)?;
    Ok(row.server_version)
}
