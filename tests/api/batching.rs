//! DESIGN §10 on the consumer side: deliveries that arrive together share one
//! inbox query and one commit, and each is still settled by its own outcome.

use std::time::Duration;

use courier::{amqp::envelope, store};
use figment::providers::Serialized;
use lapin::BasicProperties;

use crate::helpers::{
    TestEnv, consumer_stats, event_for, publish_event_into, release_row_lock, wait_until,
};

const SETTLE: Duration = Duration::from_secs(30);

/// A consumer whose batches can hold everything queued before it starts.
async fn batching_env() -> TestEnv {
    TestEnv::with(|f| {
        f.merge(Serialized::default("consumer.prefetch", 16))
            .merge(Serialized::default("consumer.concurrency", 16))
            .merge(Serialized::default("consumer.batch_size", 16))
    })
    .await
}

async fn relay_all(env: &TestEnv) {
    env.relay()
        .relay_once()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_batch_settles_each_delivery_by_its_own_outcome() -> anyhow::Result<()> {
    let env = batching_env().await;
    let mut good = Vec::new();
    for n in 0..5 {
        good.push(env.cancel_new_order(&format!("pay-batch-{n}")).await);
    }
    // The simulator fails this payment's first two attempts with a 503.
    env.cancel_new_order("fail-2x-batch").await;
    relay_all(&env).await;
    // A second copy of one event, in the same batch as the first.
    let mut conn = env.conn().await;
    let copied = store::outbox::find_by_event_id(&mut conn, good[0].1.as_uuid())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no outbox row"))?;
    env.publish_raw(
        "refunds",
        copied.payload.to_string().as_bytes(),
        envelope::properties_for(&copied, "test"),
    )
    .await;
    // An event for an order nobody canceled: permanent.
    let placed = env.place_order("pay-batch-placed").await;
    publish_event_into(&env.publisher, "refunds", &event_for(&placed)).await?;
    // Poison.
    env.publish_raw(
        "refunds",
        b"{not json",
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(uuid::Uuid::now_v7().to_string().into())
            .with_type("order.canceled".into()),
    )
    .await;
    assert_eq!(env.queue_depth("refunds").await, 9);

    let consumer = env.start_consumer().await;
    wait_until("every delivery is settled", SETTLE, async || {
        env.count("SELECT count(*) FROM refunds").await == 6
            && env.queue_depth("refunds").await == 0
            && env.queue_depth("refunds.dead").await == 2
    })
    .await;
    let stats = consumer_stats(&consumer).await;
    let refunds = &stats["refunds"];
    assert!(
        refunds.largest_batch >= 2,
        "the deliveries were never batched, so this proves nothing: {refunds:?}"
    );
    assert_eq!(refunds.handled, 6, "{refunds:?}");
    assert_eq!(refunds.duplicates, 1, "{refunds:?}");
    assert_eq!(
        refunds.retried[0].1, 1,
        "the 503 retried alone: {refunds:?}"
    );
    assert_eq!(refunds.dead_lettered["permanent"], 1, "{refunds:?}");
    assert_eq!(refunds.dead_lettered["poison"], 1, "{refunds:?}");
    assert_eq!(env.gateway_ledger().await.len(), 6, "one refund per order");
    consumer.stop().await
}

#[tokio::test]
async fn a_refund_the_database_rejects_fails_alone_and_its_batch_neighbours_are_refunded()
-> anyhow::Result<()> {
    let env = batching_env().await;
    // A row the database refuses: the batch's one commit fails, so each
    // refund must be recorded again on its own.
    env.execute(
        "CREATE FUNCTION reject_refund() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.payment_id = 'pay-rejected' THEN \
         RAISE EXCEPTION 'refund rejected by the test'; END IF; RETURN NEW; END $$",
    )
    .await;
    env.execute(
        "CREATE TRIGGER reject_refund BEFORE INSERT ON refunds \
         FOR EACH ROW EXECUTE FUNCTION reject_refund()",
    )
    .await;
    for n in 0..5 {
        env.cancel_new_order(&format!("pay-neighbour-{n}")).await;
    }
    env.cancel_new_order("pay-rejected").await;
    relay_all(&env).await;

    let consumer = env.start_consumer().await;
    wait_until(
        "the neighbours are refunded and the rejected refund is shelved",
        SETTLE,
        async || {
            env.count("SELECT count(*) FROM refunds").await == 5
                && env.queue_depth("refunds.dead").await == 1
        },
    )
    .await;
    let stats = consumer_stats(&consumer).await;
    let refunds = &stats["refunds"];
    assert!(
        refunds.largest_batch >= 2,
        "the deliveries were never batched, so the commit never failed for a batch: {refunds:?}"
    );
    assert_eq!(refunds.handled, 5, "{refunds:?}");
    assert_eq!(
        refunds.retried[0].1, 1,
        "only the rejected refund was retried, none of its neighbours: {refunds:?}"
    );
    assert_eq!(
        refunds.dead_lettered["exhausted"], 1,
        "the rejected refund went through the tiers alone: {refunds:?}"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM refunds WHERE payment_id = 'pay-rejected'")
            .await,
        0
    );
    consumer.stop().await
}

/// One batch at a time: while the first refund's batch waits on a table lock
/// the test holds, five more deliveries arrive one by one. None of them starts
/// a batch of its own; released, they are refunded together in the next one.
#[tokio::test]
async fn deliveries_that_arrive_while_the_batches_run_form_the_next_batch_together()
-> anyhow::Result<()> {
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default("consumer.prefetch", 16))
            .merge(Serialized::default("consumer.concurrency", 16))
            .merge(Serialized::default("consumer.batch_size", 16))
            .merge(Serialized::default("consumer.batches_in_flight", 1))
    })
    .await;
    let consumer = env.start_consumer().await;
    // Inserts wait behind this lock; the refund's order query does not.
    let mut holder = env.lock_rows("LOCK TABLE refunds IN SHARE MODE").await?;
    env.cancel_new_order("pay-first").await;
    relay_all(&env).await;
    env.wait_for_lock_waiters(1, "the first batch waits to insert its refund")
        .await;
    for n in 0..5 {
        env.cancel_new_order(&format!("pay-later-{n}")).await;
        relay_all(&env).await;
        wait_until("the broker hands the delivery over", SETTLE, async || {
            env.queue_depth("refunds").await == 0
        })
        .await;
    }
    release_row_lock(&mut holder).await?;
    wait_until("all six are refunded", SETTLE, async || {
        env.count("SELECT count(*) FROM refunds").await == 6
    })
    .await;
    let stats = consumer_stats(&consumer).await;
    let refunds = &stats["refunds"];
    assert_eq!(refunds.handled, 6, "{refunds:?}");
    assert_eq!(
        (refunds.batches, refunds.largest_batch),
        (2, 5),
        "the five later deliveries should share one batch: {refunds:?}"
    );
    consumer.stop().await
}
