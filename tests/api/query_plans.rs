//! How the pooled sessions plan their statements: for the tables as they are
//! when a statement runs, not as they were when the connection was new.

use courier::{
    domain::OrderId,
    store::{DbConn, inbox, orders},
};
use uuid::Uuid;

use crate::helpers::TestEnv;

/// Sequential scans of `table` so far, the ones `conn` ran included: a
/// backend reports its counters when it goes idle, at most once a second
/// unless told to report at once.
async fn seq_scans(env: &TestEnv, conn: &mut DbConn, table: &str) -> i64 {
    // Imported here only: at module level its by-value `execute` would
    // shadow `TestEnv::execute`.
    use diesel_async::RunQueryDsl;
    diesel::sql_query("SELECT pg_stat_force_next_flush()")
        .execute(conn)
        .await
        .unwrap_or_else(|e| panic!("flush: {e}"));
    env.count(&format!(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = '{table}'"
    ))
    .await
}

async fn check_batch(conn: &mut DbConn, message_ids: &[Uuid], order_ids: &[OrderId]) {
    inbox::seen_among(conn, "refunds", message_ids)
        .await
        .unwrap_or_else(|e| panic!("inbox check: {e}"));
    let found = orders::find_many_with_refund(conn, order_ids)
        .await
        .unwrap_or_else(|e| panic!("refund precheck: {e}"));
    assert_eq!(found.len(), order_ids.len());
}

#[tokio::test]
async fn batch_checks_use_their_indexes_after_the_tables_grow_from_empty() {
    let env = TestEnv::new().await;
    let mut order_ids = Vec::new();
    for n in 0..4 {
        order_ids.push(env.place_order(&format!("pay-plan-{n}")).await.id);
    }
    let message_ids: Vec<Uuid> = (0..8).map(|_| Uuid::now_v7()).collect();
    // Statistics that say the inbox and the refunds are empty, as on a young
    // database (the bench's own ANALYZE after placing its orders records the
    // same).
    env.execute("ANALYZE processed_messages, refunds, orders")
        .await;
    let mut conn = env.conn().await;
    // More runs than PostgreSQL needs to settle on a generic plan for each
    // prepared statement, while the inbox and the refunds are empty.
    for _ in 0..12 {
        check_batch(&mut conn, &message_ids, &order_ids).await;
    }

    env.execute(
        "INSERT INTO processed_messages (consumer, message_id) \
         SELECT 'refunds', gen_random_uuid() FROM generate_series(1, 20000)",
    )
    .await;
    env.execute(
        "INSERT INTO refunds (id, order_id, event_id, payment_id, amount_cents, \
                              gateway_refund_id, status) \
         SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 'pay', 100, \
                'gw', 'completed' \
         FROM generate_series(1, 20000)",
    )
    .await;
    env.execute(
        "INSERT INTO orders (id, payment_id, amount_cents, customer_email, state, version, \
                             created_at, updated_at) \
         SELECT gen_random_uuid(), 'pay', 100, 'a@example.com', 'placed', 1, now(), now() \
         FROM generate_series(1, 20000)",
    )
    .await;

    let tables = ["processed_messages", "refunds", "orders"];
    let mut before = Vec::new();
    for table in tables {
        before.push(seq_scans(&env, &mut conn, table).await);
    }
    for _ in 0..3 {
        check_batch(&mut conn, &message_ids, &order_ids).await;
    }
    for (table, before) in tables.into_iter().zip(before) {
        let after = seq_scans(&env, &mut conn, table).await;
        assert_eq!(
            after - before,
            0,
            "the batch checks scanned `{table}` from end to end ({} times) instead of using its index",
            after - before
        );
    }
}
