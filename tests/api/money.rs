//! P4 and P10 against messages the order service did not send: money moves
//! once per canceled order, and only for what the order service decided.
//! Every forged or repeated event here goes straight into `refunds`, as an
//! operator's "Publish message" in the management UI would put it there.

use std::time::Duration;

use courier::{
    amqp::envelope::headers,
    check,
    domain::{AmountCents, Order, OrderCanceled, OrderId, PaymentId, RefundKey},
    store,
};

use crate::helpers::{
    TestEnv, consumer_stats, event_for, header_text, publish_event_into, wait_until,
};

const SETTLE: Duration = Duration::from_secs(20);

async fn publish_forged(env: &TestEnv, event: &OrderCanceled) -> anyhow::Result<()> {
    publish_event_into(&env.publisher, "refunds", event).await
}

async fn order(env: &TestEnv, id: OrderId) -> anyhow::Result<Order> {
    let mut conn = env.conn().await;
    store::orders::find(&mut conn, id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("order {id} not found"))
}

/// Publishes `event` alone and asserts it is shelved in `refunds.dead` as
/// permanent with a reason containing `why`, and that no money moved.
async fn assert_refused(env: &TestEnv, event: &OrderCanceled, why: &str) -> anyhow::Result<()> {
    let consumer = env.start_consumer().await;
    publish_forged(env, event).await?;
    let dead = env.take_within("refunds.dead", SETTLE).await;
    assert_eq!(
        dead.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string()),
        Some(event.event_id.to_string())
    );
    assert_eq!(
        header_text(&dead, headers::ERROR_KIND).as_deref(),
        Some("permanent"),
        "a mismatch is never retried"
    );
    let reason = header_text(&dead, headers::LAST_ERROR).unwrap_or_default();
    assert!(reason.contains(why), "reason `{reason}` should say `{why}`");
    let stats = consumer_stats(&consumer).await;
    assert_eq!(
        stats["refunds"].retried.iter().map(|(_, n)| n).sum::<u64>(),
        0
    );
    assert!(env.gateway_ledger().await.is_empty(), "no money moved");
    assert_eq!(env.count("SELECT count(*) FROM refunds").await, 0);
    // A message the order record does not back is not the order's refund
    // failing: no refund.failed, so no order is marked for it.
    consumer.stop().await?;
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE publisher = 'refunds'")
            .await,
        0,
        "a refused message raises no refund event"
    );
    Ok(())
}

#[tokio::test]
async fn a_second_event_for_a_refunded_order_moves_no_money() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let consumer = env.start_consumer().await;
    let (order_id, _) = env.cancel_new_order("pay-twice-1").await;
    env.relay().relay_once().await?;
    wait_until("the refund is made", SETTLE, async || {
        env.count("SELECT count(*) FROM refunds").await == 1
    })
    .await;

    // The same cancellation again under a new message id: a replay of a dead
    // letter through "Publish message", or a forgery.
    let canceled = order(&env, order_id).await?;
    publish_forged(&env, &event_for(&canceled)).await?;
    wait_until("the second event is absorbed", SETTLE, async || {
        consumer_stats(&consumer)
            .await
            .get("refunds")
            .is_some_and(|s| s.duplicates == 1)
    })
    .await;

    let ledger = env.gateway_ledger().await;
    assert_eq!(ledger.len(), 1, "the gateway refunded once: {ledger:?}");
    assert_eq!(
        ledger[0].idempotency_key,
        RefundKey::for_order(order_id).to_string(),
        "the refund's identity comes from the order"
    );
    assert_eq!(env.count("SELECT count(*) FROM refunds").await, 1);
    assert_eq!(
        env.count("SELECT count(*) FROM processed_messages WHERE consumer = 'refunds'")
            .await,
        2,
        "the second message is recorded as processed"
    );
    assert_eq!(
        env.queue_depth("refunds.dead").await,
        0,
        "and acked, not shelved"
    );
    // The order service takes the refund's completion back to the order
    // (its relay finds nothing left to publish: the test's relay did).
    let producer = env.start_producer().await;
    wait_until("the order shows its refund", SETTLE, async || {
        env.count("SELECT count(*) FROM orders WHERE refund_status = 'refunded'")
            .await
            == 1
    })
    .await;
    let mut conn = env.conn().await;
    let (report, _) =
        check::gather(&mut conn, &env.settings.amqp, &env.settings.gateway, None).await?;
    assert!(report.passed(), "{report:?}");
    producer.stop().await?;
    consumer.stop().await
}

#[tokio::test]
async fn two_events_for_one_order_in_flight_together_refund_it_once_at_the_gateway()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let (order_id, _) = env.cancel_new_order("pay-race-1").await;
    let canceled = order(&env, order_id).await?;
    // Both wait in the queue, so the consumer's concurrent deliveries can
    // pass the "already refunded?" check together: only the gateway's key,
    // which both derive from the order, keeps the money single.
    for _ in 0..4 {
        publish_forged(&env, &event_for(&canceled)).await?;
    }
    let consumer = env.start_consumer().await;
    wait_until("all four are settled", SETTLE, async || {
        consumer_stats(&consumer)
            .await
            .get("refunds")
            .is_some_and(|s| s.handled + s.duplicates == 4)
    })
    .await;
    let stats = consumer_stats(&consumer).await;
    assert_eq!(stats["refunds"].handled, 1);
    assert_eq!(stats["refunds"].duplicates, 3);
    assert_eq!(env.gateway_ledger().await.len(), 1);
    assert_eq!(env.count("SELECT count(*) FROM refunds").await, 1);
    consumer.stop().await
}

#[tokio::test]
async fn an_event_for_an_order_that_is_not_canceled_is_dead_lettered_and_refunds_nothing()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let placed = env.place_order("pay-not-canceled").await;
    assert_refused(
        &env,
        &event_for(&placed),
        &format!("order {} is not canceled", placed.id),
    )
    .await
}

#[tokio::test]
async fn an_event_for_an_order_that_does_not_exist_is_dead_lettered_and_refunds_nothing()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let mut ghost = env.place_order("pay-ghost").await;
    ghost.id = OrderId::generate();
    assert_refused(
        &env,
        &event_for(&ghost),
        &format!("order {} does not exist", ghost.id),
    )
    .await
}

#[tokio::test]
async fn an_event_claiming_more_than_the_order_is_dead_lettered_and_refunds_nothing()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let (order_id, _) = env.cancel_new_order("pay-inflated").await;
    let mut inflated = event_for(&order(&env, order_id).await?);
    inflated.amount_cents = AmountCents::parse(99_999_999)?;
    assert_refused(&env, &inflated, "amount 99999999 exceeds the order's 1999").await
}

#[tokio::test]
async fn an_event_naming_another_payment_is_dead_lettered_and_refunds_nothing() -> anyhow::Result<()>
{
    let env = TestEnv::new().await;
    let (order_id, _) = env.cancel_new_order("pay-honest").await;
    let mut redirected = event_for(&order(&env, order_id).await?);
    redirected.payment_id = PaymentId::parse("pay-attacker")?;
    assert_refused(
        &env,
        &redirected,
        "payment pay-attacker is not the payment pay-honest",
    )
    .await
}
