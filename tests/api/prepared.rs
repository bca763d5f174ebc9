//! The writes on an order's path are prepared once per connection
//! (`store::prepared`), where Diesel would prepare them again on every run.

use courier::store::{self, inbox, outbox};
use diesel::{QueryableByName, sql_types::BigInt};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::helpers::TestEnv;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// How many statements this session holds prepared whose text starts with `prefix`.
async fn prepared_like(conn: &mut AsyncPgConnection, prefix: &str) -> i64 {
    diesel::sql_query(
        "SELECT count(*) AS n FROM pg_prepared_statements WHERE starts_with(statement, $1)",
    )
    .bind::<diesel::sql_types::Text, _>(prefix)
    .get_result::<Count>(conn)
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .n
}

#[tokio::test]
async fn hot_writes_are_prepared_once_per_connection_and_plain_sql_queries_are_not() {
    let env = TestEnv::new().await;
    let mut conn = store::connect(&env.settings.database.url())
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    for batch in [1, 3] {
        let ids: Vec<Uuid> = (0..batch).map(|_| Uuid::now_v7()).collect();
        let new = inbox::record_many(&mut conn, "refunds", &ids)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(new.len(), batch, "every message id was new");
        outbox::mark_published(&mut conn, &[-1, -2])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // Two runs each, of different batch sizes: one prepared statement each.
    assert_eq!(
        prepared_like(&mut conn, "INSERT INTO processed_messages").await,
        1
    );
    assert_eq!(
        prepared_like(&mut conn, "UPDATE outbox SET published_at").await,
        1
    );

    // What the view shows for a statement Diesel does not cache: nothing
    // left prepared after it ran, however often.
    for _ in 0..2 {
        diesel::sql_query("SELECT 42::bigint AS n")
            .get_result::<Count>(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(prepared_like(&mut conn, "SELECT 42").await, 0);
}
