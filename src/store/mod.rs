//! PostgreSQL through Diesel (async): the pool, the migrations, and one file
//! per table holding all of that table's SQL.
//!
//! No broker I/O happens here, and no transaction here ever waits on the broker.

pub mod cancel_batch;
pub mod dead_letter_actions;
pub mod event_reader;
pub mod event_store;
pub mod ground_truth;
pub mod inbox;
pub mod metrics;
pub mod orders;
pub mod outbox;
pub mod prepared;
pub mod refunds;
pub mod schema;
pub mod shipments;
pub mod statements;

use diesel::ConnectionError;
use diesel_async::{
    AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl,
    pooled_connection::{
        AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod, deadpool::Pool,
    },
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::{FutureExt, future::BoxFuture};

use crate::config::DatabaseSettings;

pub type DbPool = Pool<AsyncPgConnection>;
pub type DbConn = diesel_async::pooled_connection::deadpool::Object<AsyncPgConnection>;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// How PostgreSQL and tokio-postgres word a session that is gone.
const CONNECTION_GONE: [&str; 3] = [
    "terminating connection",
    "connection closed",
    "error communicating with the server",
];

/// A storage failure, split by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or the connection broke: wait and retry
    /// without counting it against a message (nothing was decided).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database answered with an error.
    #[error("database error: {0}")]
    Query(#[from] diesel::result::Error),
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for StoreError {
    fn from(error: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        Self::Unavailable(error.to_string())
    }
}

impl StoreError {
    /// Query errors that mean the connection, not the statement, failed.
    pub fn classify(error: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind, Error};
        match &error {
            Error::DatabaseError(DatabaseErrorKind::ClosedConnection, _) => {
                Self::Unavailable(error.to_string())
            }
            // Unknown: the server ending the session (SQLSTATE 57P01..03).
            // UnableToSendCommand: how diesel-async reports any failure without
            // a SQLSTATE, a bad parameter as well as a dead socket, so only the
            // transport's own messages count.
            Error::DatabaseError(
                DatabaseErrorKind::Unknown | DatabaseErrorKind::UnableToSendCommand,
                info,
            ) if CONNECTION_GONE.iter().any(|m| info.message().contains(m)) => {
                Self::Unavailable(error.to_string())
            }
            _ => Self::Query(error),
        }
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// An error that can tell whether the connection, rather than the operation,
/// failed: what [`retry_once_if_unavailable`] retries on.
pub trait ConnectionFailure {
    fn is_connection_failure(&self) -> bool;
}

impl ConnectionFailure for StoreError {
    fn is_connection_failure(&self) -> bool {
        self.is_unavailable()
    }
}

/// An `AsyncFnMut(&mut AsyncPgConnection) -> R` whose future is `Send`, as
/// axum's handlers need. Stable Rust cannot bound an async closure's future
/// yet, so it is named through `FnMut` instead: diesel-async's `AsyncFunc`
/// workaround, for a closure that may be called more than once.
pub trait SendOperation<'c, R>: FnMut(&'c mut AsyncPgConnection) -> Self::Fut {
    type Fut: Future<Output = R> + Send;
}

impl<'c, R, F, Fut> SendOperation<'c, R> for F
where
    F: FnMut(&'c mut AsyncPgConnection) -> Fut,
    Fut: Future<Output = R> + Send,
{
    type Fut = Fut;
}

/// Runs `operation` on a pooled connection and, if that connection turned out
/// to be dead, once more on another one.
///
/// The pool does not ping on checkout (see [`pool`]), so a session the server
/// ended since its last use fails its first statement; one retry absorbs that
/// without the caller seeing an error. Only for operations that may run twice:
/// the first attempt may have committed just before its connection died. The
/// order API's may: a change re-reads the order and lets the domain decide
/// again (a committed cancel is then refused, never raised twice), and a
/// repeated insert of the same order fails on its primary key.
/// A pool that cannot hand out a connection is not retried: that is the
/// database being down, which a second try at once does not change.
pub async fn retry_once_if_unavailable<T, E, F>(pool: &DbPool, mut operation: F) -> Result<T, E>
where
    for<'c> F:
        AsyncFnMut(&'c mut AsyncPgConnection) -> Result<T, E> + SendOperation<'c, Result<T, E>>,
    E: From<StoreError> + ConnectionFailure,
{
    let mut conn = pool.get().await.map_err(StoreError::from)?;
    match operation(&mut conn).await {
        Err(error) if error.is_connection_failure() => {
            tracing::debug!("pooled connection was dead; retrying once on another");
            // Out of the pool for good, even if the client has not yet seen
            // the socket close, so the retry cannot be handed the same session.
            drop(deadpool::managed::Object::take(conn));
            let mut conn = pool.get().await.map_err(StoreError::from)?;
            operation(&mut conn).await
        }
        result => result,
    }
}

/// Builds the connection pool. Connections are opened lazily, so this succeeds
/// even while the database is down; the first query reports it.
///
/// A checkout does not ping: diesel-async's default (`Verified`) spends a
/// `SELECT 1` round trip on every checkout, about a third of an order's
/// statements. `Fast` still drops a connection whose socket the client saw
/// close; one that died unseen fails its first statement with
/// [`StoreError::Unavailable`], which callers already handle: the consumer
/// requeues and pauses until [`ping`] answers, the relay backs off, the order
/// API retries once through [`retry_once_if_unavailable`].
///
/// Every pooled session plans each statement afresh on every run (see
/// `PLAN_FOR_EACH_RUN` below for why).
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<DbPool> {
    pool_with(settings, establish_pooled)
}

/// The relays' pool: as [`pool`], but its sessions commit without waiting
/// for the WAL flush (`synchronous_commit = off`). A relay writes only what
/// it may lose: the mark that a row was published and the note that a
/// publish failed. A mark lost in a database crash (at most the last few
/// hundred milliseconds' worth) makes the row pending again, so it is
/// published once more and the consumers' inboxes absorb the copy, as after
/// a relay killed between a confirm and its mark; a lost failure note only
/// makes the row due sooner. Every write that must survive (orders, events,
/// refunds, inbox rows) commits on the other pools, which wait for the flush,
/// and a flush also makes every earlier commit durable. What it saves: each
/// relay step's mark stops holding a relay connection through a WAL flush.
pub fn relay_pool(settings: &DatabaseSettings) -> anyhow::Result<DbPool> {
    pool_with(settings, establish_relay_pooled)
}

type Establish = fn(&str) -> BoxFuture<'_, diesel::ConnectionResult<AsyncPgConnection>>;

fn pool_with(settings: &DatabaseSettings, establish: Establish) -> anyhow::Result<DbPool> {
    let mut config = ManagerConfig::default();
    config.recycling_method = RecyclingMethod::Fast;
    config.custom_setup = Box::new(establish);
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(settings.url(), config);
    Pool::builder(manager)
        .max_size(settings.pool_size)
        .wait_timeout(Some(settings.connect_timeout))
        .create_timeout(Some(settings.connect_timeout))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the database pool: {e}"))
}

/// Plans every statement for the table sizes of the moment it runs.
///
/// Diesel prepares each statement once per connection, and after five runs
/// PostgreSQL may switch a prepared statement to a generic plan made for the
/// table sizes of that moment and keep it for the life of the connection. On
/// a new database the inbox and the refunds are empty then, so the generic
/// plans scan them sequentially, and every batch pays a scan that grows with
/// the table until an autovacuum happens to invalidate the plan: in a 20 s
/// bench run at 900 orders/s, 594 sequential scans read 6.4 million inbox
/// rows, and cancel→refund p99 doubled (BENCHMARKS.md). Planning each run
/// costs a fraction of a millisecond per statement; a stale plan costs a
/// table scan.
const PLAN_FOR_EACH_RUN: &str = "SET plan_cache_mode = force_custom_plan";

fn establish_pooled(url: &str) -> BoxFuture<'_, diesel::ConnectionResult<AsyncPgConnection>> {
    establish_with(url, &[PLAN_FOR_EACH_RUN])
}

/// See [`relay_pool`].
const COMMIT_WITHOUT_FLUSH: &str = "SET synchronous_commit = off";

fn establish_relay_pooled(url: &str) -> BoxFuture<'_, diesel::ConnectionResult<AsyncPgConnection>> {
    establish_with(url, &[PLAN_FOR_EACH_RUN, COMMIT_WITHOUT_FLUSH])
}

fn establish_with<'a>(
    url: &'a str,
    session: &'static [&'static str],
) -> BoxFuture<'a, diesel::ConnectionResult<AsyncPgConnection>> {
    async move {
        let mut conn = AsyncPgConnection::establish(url).await?;
        conn.set_instrumentation(statements::CountStatements::process_wide());
        for setting in session {
            diesel::sql_query(*setting)
                .execute(&mut conn)
                .await
                .map_err(ConnectionError::CouldntSetupConfiguration)?;
        }
        Ok(conn)
    }
    .boxed()
}

/// Checks that the database answers.
pub async fn ping(pool: &DbPool) -> Result<(), StoreError> {
    let mut conn = pool.get().await?;
    diesel::sql_query("SELECT 1")
        .execute(&mut conn)
        .await
        .map_err(StoreError::classify)?;
    Ok(())
}

/// Opens one dedicated connection (the CLI's commands, the demo, the bench).
pub async fn connect(url: &str) -> Result<AsyncPgConnection, StoreError> {
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    conn.set_instrumentation(statements::CountStatements::process_wide());
    Ok(conn)
}

/// Applies pending migrations and returns the versions applied.
pub async fn run_migrations(url: &str) -> anyhow::Result<Vec<String>> {
    let connection = connect(url).await?;
    // The harness drives Diesel's synchronous migration code on a blocking
    // thread, so it must not run on the async executor itself.
    tokio::task::spawn_blocking(move || {
        let mut harness = AsyncMigrationHarness::new(connection);
        harness
            .run_pending_migrations(MIGRATIONS)
            .map(|versions| versions.iter().map(ToString::to_string).collect())
            .map_err(|e| anyhow::anyhow!("migrations failed: {e}"))
    })
    .await?
}

#[cfg(test)]
mod tests {
    use diesel::result::{DatabaseErrorKind, Error};

    use super::StoreError;

    fn error(kind: DatabaseErrorKind, message: &str) -> Error {
        Error::DatabaseError(kind, Box::new(message.to_owned()))
    }

    #[test]
    fn only_a_session_the_server_ended_or_a_dead_socket_is_unavailable() {
        for (kind, message, unavailable) in [
            (
                DatabaseErrorKind::Unknown,
                "terminating connection due to administrator command",
                true,
            ),
            (
                DatabaseErrorKind::UnableToSendCommand,
                "connection closed",
                true,
            ),
            (
                DatabaseErrorKind::UnableToSendCommand,
                "error communicating with the server: Connection reset by peer (os error 104)",
                true,
            ),
            (DatabaseErrorKind::ClosedConnection, "anything", true),
            // Refused statements, on a connection that is fine.
            (
                DatabaseErrorKind::UnableToSendCommand,
                "error serializing parameter 0",
                false,
            ),
            (DatabaseErrorKind::Unknown, "outbox refused", false),
            (
                DatabaseErrorKind::UniqueViolation,
                "duplicate key value",
                false,
            ),
        ] {
            assert_eq!(
                StoreError::classify(error(kind, message)).is_unavailable(),
                unavailable,
                "{kind:?}: {message}"
            );
        }
    }
}
