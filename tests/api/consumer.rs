//! P3–P6 on the consumer side: acks only after a durable outcome, one effect
//! per message, bounded delayed retries, dead letters with their reasons.

use std::time::Duration;

use courier::{
    amqp::envelope::{self, headers},
    store,
};
use figment::providers::Serialized;
use lapin::BasicProperties;

use crate::helpers::{Service, TestEnv, consumer_stats, header_int, header_text, wait_until};

const SETTLE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_canceled_order_is_refunded_once_and_its_customer_notified() {
    let env = TestEnv::new().await;
    let consumer = env.start_consumer().await;
    let (order_id, _) = env.cancel_new_order("pay-happy-1").await;
    env.relay()
        .relay_once()
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    wait_until(
        "the refund and the notification are recorded",
        SETTLE,
        async || env.count("SELECT count(*) FROM processed_messages").await == 2,
    )
    .await;
    let mut conn = env.conn().await;
    let refunds = store::refunds::all(&mut conn).await.unwrap_or_default();
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0].order_id, order_id.as_uuid());
    let ledger = env.gateway_ledger().await;
    assert_eq!(ledger.len(), 1);
    assert_eq!(
        ledger[0].idempotency_key,
        courier::domain::RefundKey::for_order(order_id).to_string(),
        "the order's refund key is the idempotency key"
    );
    assert_eq!(ledger[0].refund_id, refunds[0].gateway_refund_id);
    let sent = std::fs::read_to_string(&env.settings.notifications.file_path).unwrap_or_default();
    assert!(
        sent.contains("ada@example.org") && sent.contains(&order_id.to_string()),
        "{sent}"
    );
    assert_eq!(
        env.queue_depth("refunds").await,
        0,
        "the delivery was acked"
    );
    consumer.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_refund_is_made_once_when_the_same_event_is_delivered_twice() {
    let env = TestEnv::new().await;
    let (_, event_id) = env.cancel_new_order("pay-dup-1").await;
    env.relay()
        .relay_once()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // A second copy, as a relay that died before marking would publish it.
    let mut conn = env.conn().await;
    let row = store::outbox::find_by_event_id(&mut conn, event_id.as_uuid())
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no outbox row"));
    env.publish_raw(
        "refunds",
        row.payload.to_string().as_bytes(),
        envelope::properties_for(&row, "test"),
    )
    .await;
    assert_eq!(env.queue_depth("refunds").await, 2);

    let consumer = env.start_consumer().await;
    wait_until("both copies are settled", SETTLE, async || {
        let stats = consumer_stats(&consumer).await;
        stats
            .get("refunds")
            .is_some_and(|s| s.handled + s.duplicates == 2)
    })
    .await;
    let stats = consumer_stats(&consumer).await;
    assert_eq!(stats["refunds"].handled, 1);
    assert_eq!(stats["refunds"].duplicates, 1);
    assert_eq!(env.count("SELECT count(*) FROM refunds").await, 1);
    assert_eq!(
        env.gateway_ledger().await.len(),
        1,
        "the gateway refunded once"
    );
    consumer.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_transient_gateway_failure_goes_through_the_delay_tiers_and_then_succeeds() {
    let env = TestEnv::new().await;
    let consumer = env.start_consumer().await;
    // The simulator fails this payment's first two attempts with a 503.
    env.cancel_new_order("fail-2x-tiers").await;
    env.relay()
        .relay_once()
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    wait_until("the refund is made", SETTLE, async || {
        env.count("SELECT count(*) FROM refunds").await == 1
    })
    .await;
    let stats = consumer_stats(&consumer).await;
    let retried: Vec<(String, u64)> = stats["refunds"].retried.clone();
    assert_eq!(
        retried,
        vec![
            ("refunds.retry.200ms".to_owned(), 1),
            ("refunds.retry.400ms".to_owned(), 1),
            ("refunds.retry.800ms".to_owned(), 0)
        ],
        "one failure per tier, climbing"
    );
    assert_eq!(stats["refunds"].dead_total(), 0);
    assert_eq!(env.gateway_ledger().await.len(), 1);
    consumer.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

/// Cancels one order, relays its event and takes the refund's dead letter,
/// checking it was shelved as `kind`.
async fn cancel_and_take_refund_dead_letter(
    env: &TestEnv,
    payment_id: &str,
    kind: &str,
) -> (courier::domain::EventId, lapin::message::BasicGetMessage) {
    let (_, event_id) = env.cancel_new_order(payment_id).await;
    env.relay()
        .relay_once()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dead = env.take_within("refunds.dead", SETTLE).await;
    assert_eq!(
        header_text(&dead, headers::ERROR_KIND).as_deref(),
        Some(kind)
    );
    (event_id, dead)
}

#[tokio::test]
async fn an_exhausted_message_lands_in_refunds_dead_with_its_attempts() {
    let env = TestEnv::new().await;
    let consumer = env.start_consumer().await;
    let (event_id, dead) =
        cancel_and_take_refund_dead_letter(&env, "fail-99x-exhausted", "transient").await;
    let event_id_text = event_id.to_string();
    assert_eq!(
        dead.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str()),
        Some(event_id_text.as_str())
    );
    assert_eq!(
        header_int(&dead, headers::ATTEMPT),
        Some(4),
        "first try + three tiers"
    );
    assert!(header_text(&dead, headers::LAST_ERROR).is_some_and(|e| e.contains("503")));
    assert!(header_text(&dead, headers::FIRST_FAILED_AT).is_some());
    assert_eq!(
        header_text(&dead, headers::CONSUMER).as_deref(),
        Some("refunds")
    );
    assert_eq!(
        header_text(&dead, headers::ORIGINAL_ROUTING_KEY).as_deref(),
        Some("order.canceled")
    );
    assert!(
        header_text(&dead, headers::X_DEATH).is_none()
            && !dead
                .delivery
                .properties
                .headers()
                .as_ref()
                .is_some_and(|h| h.contains_key("x-death")),
        "x-death is never copied"
    );
    wait_until_dead_lettered(&consumer, "exhausted", 1).await;
    assert_eq!(env.count("SELECT count(*) FROM refunds").await, 0);
    consumer.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_permanent_gateway_failure_is_dead_lettered_at_once_with_the_gateway_error() {
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default(
            "gateway_simulator.failing_payment_ids",
            ["pay-never-1"],
        ))
    })
    .await;
    let consumer = env.start_consumer().await;
    let (_, dead) = cancel_and_take_refund_dead_letter(&env, "pay-never-1", "permanent").await;
    assert_eq!(header_int(&dead, headers::ATTEMPT), Some(1));
    let error = header_text(&dead, headers::LAST_ERROR).unwrap_or_default();
    assert!(
        error.contains("422") && error.contains("cannot be refunded"),
        "{error}"
    );
    let stats = consumer_stats(&consumer).await;
    assert!(
        stats["refunds"].retried.iter().all(|(_, n)| *n == 0),
        "no retries for a permanent failure"
    );
    assert_eq!(env.count("SELECT count(*) FROM refunds").await, 0);
    consumer.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_handler_slower_than_its_deadline_is_retried_and_then_shelved_as_transient() {
    // The gateway answers after 2 s, the HTTP client would wait 10 s, and the
    // handler's own deadline is 300 ms: only that deadline can end each try,
    // well before the broker's consumer_timeout could.
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default("gateway_simulator.latency", "2s"))
            .merge(Serialized::default("gateway.timeout", "10s"))
            .merge(Serialized::default("consumer.handler_timeout", "300ms"))
    })
    .await;
    let consumer = env.start_consumer().await;
    let (_, dead) = cancel_and_take_refund_dead_letter(&env, "pay-slow-1", "transient").await;
    assert_eq!(header_int(&dead, headers::ATTEMPT), Some(4));
    let error = header_text(&dead, headers::LAST_ERROR).unwrap_or_default();
    assert!(
        error.contains("did not finish within 300ms"),
        "the handler's deadline ended the try: {error}"
    );
    wait_until_dead_lettered(&consumer, "exhausted", 1).await;
    let stats = consumer_stats(&consumer).await;
    assert!(
        stats["refunds"].retried.iter().all(|(_, n)| *n == 1),
        "one try per tier: {:?}",
        stats["refunds"].retried
    );
    assert_eq!(env.count("SELECT count(*) FROM refunds").await, 0);
    consumer.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

/// The consumer counts a dead letter once the broker has confirmed the copy,
/// and the test may take that copy off `refunds.dead` before the confirm
/// reaches the consumer; so the counter is awaited, not read once.
async fn wait_until_dead_lettered(consumer: &Service, kind: &str, expected: u64) {
    wait_until(
        &format!("the consumer counts {expected} `{kind}` dead letter(s)"),
        SETTLE,
        async || {
            let stats = consumer_stats(consumer).await;
            let counted = stats
                .get("refunds")
                .and_then(|s| s.dead_lettered.get(kind).copied())
                .unwrap_or(0);
            assert!(counted <= expected, "over-counted `{kind}`: {stats:?}");
            counted == expected
        },
    )
    .await;
}

fn valid_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(uuid::Uuid::now_v7().to_string().into())
        .with_type("order.canceled".into())
        .with_delivery_mode(2)
}

/// Publishes a poison message into `refunds`, checks it is dead-lettered at
/// once with `reason`, then checks a good event after it is still refunded.
async fn assert_poison_is_shelved_and_the_consumer_keeps_going(
    properties: BasicProperties,
    body: &[u8],
    reason: &str,
) {
    let env = TestEnv::new().await;
    let consumer = env.start_consumer().await;
    env.publish_raw("refunds", body, properties).await;

    let dead = env.take_within("refunds.dead", SETTLE).await;
    assert_eq!(
        header_text(&dead, headers::ERROR_KIND).as_deref(),
        Some("poison")
    );
    let error = header_text(&dead, headers::LAST_ERROR).unwrap_or_default();
    assert!(error.contains(reason), "expected `{reason}` in `{error}`");
    assert_eq!(
        dead.delivery.data, body,
        "the body is kept as it came, for analysis and replay"
    );
    wait_until_dead_lettered(&consumer, "poison", 1).await;
    let stats = consumer_stats(&consumer).await;
    assert!(
        stats["refunds"].retried.iter().all(|(_, n)| *n == 0),
        "poison is never retried"
    );

    env.cancel_new_order("pay-after-poison").await;
    env.relay()
        .relay_once()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_until("the next good event is refunded", SETTLE, async || {
        env.count("SELECT count(*) FROM refunds").await == 1
    })
    .await;
    consumer.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn malformed_json_is_dead_lettered_at_once_and_the_consumer_keeps_going() {
    assert_poison_is_shelved_and_the_consumer_keeps_going(
        valid_properties(),
        b"{\"order_id\": oops",
        "not a valid `order.canceled`",
    )
    .await;
}

#[tokio::test]
async fn a_message_without_message_id_is_dead_lettered_at_once_and_the_consumer_keeps_going() {
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_type("order.canceled".into());
    assert_poison_is_shelved_and_the_consumer_keeps_going(properties, b"{}", "missing message id")
        .await;
}

#[tokio::test]
async fn an_unknown_event_type_is_dead_lettered_at_once_and_the_consumer_keeps_going() {
    let properties = valid_properties().with_type("order.teleported".into());
    assert_poison_is_shelved_and_the_consumer_keeps_going(
        properties,
        b"{}",
        "unknown event type `order.teleported`",
    )
    .await;
}

#[tokio::test]
async fn an_oversize_body_is_dead_lettered_at_once_and_the_consumer_keeps_going() {
    let body = vec![b' '; 1024 * 1024 + 1];
    assert_poison_is_shelved_and_the_consumer_keeps_going(
        valid_properties(),
        &body,
        "exceeds the limit",
    )
    .await;
}
