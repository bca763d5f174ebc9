//! The statement count behind `courier_database_statements_total` and the
//! bench's statements per order.

use std::sync::atomic::{AtomicU64, Ordering};

use courier::store::{self, inbox, statements::CountStatements};
use diesel_async::{AsyncConnection, RunQueryDsl};
use uuid::Uuid;

use crate::helpers::TestEnv;

// A counter of this test's own: the process-wide one also counts every
// other test running beside it.
static COUNTED: AtomicU64 = AtomicU64::new(0);

fn counted() -> u64 {
    AtomicU64::load(&COUNTED, Ordering::Relaxed)
}

#[tokio::test]
async fn every_statement_sent_is_counted_once_begin_commit_and_failures_included() {
    let env = TestEnv::new().await;
    let mut conn = store::connect(&env.settings.database.url())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    conn.set_instrumentation(CountStatements::counting_into(&COUNTED));

    // One plain statement, one built by Diesel.
    diesel::sql_query("SELECT 1")
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    inbox::seen_among(&mut conn, "refunds", &[Uuid::now_v7()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(counted(), 2);

    // BEGIN, the insert, COMMIT.
    let message_id = Uuid::now_v7();
    conn.transaction::<_, diesel::result::Error, _>(async |conn| {
        inbox::record(conn, "refunds", message_id).await?;
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(counted(), 5);

    // A statement the server refuses was sent all the same.
    assert!(
        diesel::sql_query("SELECT * FROM no_such_table")
            .execute(&mut conn)
            .await
            .is_err()
    );
    assert_eq!(counted(), 6);
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM processed_messages WHERE message_id = '{message_id}'"
        ))
        .await,
        1,
        "the counted transaction committed"
    );
}
