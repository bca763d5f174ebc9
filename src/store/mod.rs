//! PostgreSQL through Diesel (async): the pool, the migrations, and one file
//! per table holding all of that table's SQL.
//!
//! No broker I/O happens here, and no transaction here ever waits on the broker.

pub mod inbox;
pub mod metrics;
pub mod orders;
pub mod outbox;
pub mod refunds;
pub mod schema;

use diesel_async::{
    AsyncConnection, AsyncMigrationHarness, AsyncPgConnection,
    pooled_connection::{AsyncDieselConnectionManager, deadpool::Pool},
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::config::DatabaseSettings;

pub type DbPool = Pool<AsyncPgConnection>;
pub type DbConn = diesel_async::pooled_connection::deadpool::Object<AsyncPgConnection>;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

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
            Error::DatabaseError(DatabaseErrorKind::Unknown, info)
                if info.message().contains("terminating connection")
                    || info.message().contains("connection closed") =>
            {
                Self::Unavailable(error.to_string())
            }
            _ => Self::Query(error),
        }
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Builds the connection pool. Connections are opened lazily, so this succeeds
/// even while the database is down; the first query reports it.
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<DbPool> {
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(settings.url());
    Pool::builder(manager)
        .max_size(settings.pool_size)
        .wait_timeout(Some(settings.connect_timeout))
        .create_timeout(Some(settings.connect_timeout))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the database pool: {e}"))
}

/// Checks that the database answers.
pub async fn ping(pool: &DbPool) -> Result<(), StoreError> {
    use diesel_async::RunQueryDsl;
    let mut conn = pool.get().await?;
    diesel::sql_query("SELECT 1")
        .execute(&mut conn)
        .await
        .map_err(StoreError::classify)?;
    Ok(())
}

/// Opens one dedicated connection (the relay's LISTEN connection, migrations).
pub async fn connect(url: &str) -> Result<AsyncPgConnection, StoreError> {
    AsyncPgConnection::establish(url)
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))
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
