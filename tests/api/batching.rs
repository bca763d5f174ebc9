//! DESIGN §10 on the consumer side: deliveries that arrive together share one
//! inbox query and one commit, and each is still settled by its own outcome.

use std::time::Duration;

use courier::{amqp::envelope, store};
use figment::providers::Serialized;
use lapin::BasicProperties;

use crate::helpers::{
    Service, TestEnv, consumer_stats, event_for, publish_event_into, release_row_lock, wait_until,
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

/// Longer than the tests below wait for what must happen before it.
const LONG_LINGER: &str = "25s";

/// A consumer whose background workers linger [`LONG_LINGER`], and one
/// canceled order: its refund is made at once (well within the linger, so a
/// refunds batch that waited for company fails here) while its notification
/// is held, waiting for company.
async fn a_notification_waiting_for_company(batch_size: usize) -> (TestEnv, Service) {
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default("consumer.batch_size", batch_size))
            .merge(Serialized::default(
                "consumer.background_linger",
                LONG_LINGER,
            ))
    })
    .await;
    let consumer = env.start_consumer().await;
    env.cancel_new_order("pay-linger-first").await;
    relay_all(&env).await;
    wait_until("the first refund is made at once", SETTLE / 2, async || {
        env.count("SELECT count(*) FROM refunds").await == 1
    })
    .await;
    wait_until(
        "the notifications worker holds the first delivery",
        SETTLE / 2,
        async || env.queue_depth("notifications").await == 0,
    )
    .await;
    let waiting = consumer_stats(&consumer).await;
    assert_eq!(
        waiting["notifications"].handled, 0,
        "the first notification should wait for company: {waiting:?}"
    );
    (env, consumer)
}

/// The refunds worker starts every batch at once, with what has arrived; the
/// notifications worker, whose effect no one waits on to the millisecond,
/// holds its first delivery for up to `consumer.background_linger` and takes
/// what arrives meanwhile into the same batch.
#[tokio::test]
async fn a_background_worker_waits_for_company_and_the_refunds_worker_does_not()
-> anyhow::Result<()> {
    let (env, consumer) = a_notification_waiting_for_company(2).await;
    env.cancel_new_order("pay-linger-second").await;
    relay_all(&env).await;
    wait_until(
        "both orders are refunded and notified",
        SETTLE,
        async || {
            let stats = consumer_stats(&consumer).await;
            stats["refunds"].handled == 2 && stats["notifications"].handled == 2
        },
    )
    .await;
    let stats = consumer_stats(&consumer).await;
    assert_eq!(
        (stats["refunds"].batches, stats["refunds"].largest_batch),
        (2, 1),
        "each refund in its own batch: {stats:?}"
    );
    assert_eq!(
        (
            stats["notifications"].batches,
            stats["notifications"].largest_batch
        ),
        (1, 2),
        "both notifications in one batch: {stats:?}"
    );
    consumer.stop().await
}

/// A shutdown ends the linger: the delivery that waited is handled and acked
/// before the worker stops, long before the linger would have run out.
#[tokio::test]
async fn a_lingering_batch_is_handled_at_shutdown_without_waiting_out_its_linger()
-> anyhow::Result<()> {
    let (env, consumer) = a_notification_waiting_for_company(32).await;
    tokio::time::timeout(SETTLE / 3, consumer.stop())
        .await
        .map_err(|_| anyhow::anyhow!("the stop waited for the linger"))??;
    assert_eq!(
        env.count("SELECT count(*) FROM processed_messages WHERE consumer = 'notifications'")
            .await,
        1,
        "the waiting notification is handled before the worker stops"
    );
    assert_eq!(env.queue_depth("notifications").await, 0, "and acked");
    Ok(())
}
