//! The refund context's events back to the order service: `refund.completed`
//! written with the refund, `refund.failed` when a refund is given up on
//! (durable before its request is shelved, once per request, no inbox row),
//! and the order's refund status converging whatever order they arrive in.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use courier::{
    amqp::envelope::{self, headers},
    domain::{EventId, OrderId, RefundCompleted, RefundFailed},
};
use figment::providers::Serialized;
use lapin::{BasicProperties, types::FieldTable};
use serde_json::Value;

use crate::helpers::{
    Service, TestEnv, consumer_stats, header_text, publish_record_into, wait_until,
};

const SETTLE: Duration = Duration::from_secs(30);

/// `GET /orders/{id}`'s `refund_status`, once it has one.
async fn refund_status_shown(api: &Service, order: OrderId) -> Value {
    let url = format!("http://{}/orders/{order}", api.addr);
    let mut shown = Value::Null;
    wait_until("the order shows a refund status", SETTLE, async || {
        let order: Value = reqwest::get(&url)
            .await
            .and_then(reqwest::Response::error_for_status)
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .json()
            .await
            .unwrap_or_default();
        shown = order["refund_status"].clone();
        !shown.is_null()
    })
    .await;
    shown
}

/// Consumer and order service both running, as in production.
async fn running(env: &TestEnv) -> (Service, Service) {
    (env.start_consumer().await, env.start_producer().await)
}

async fn refund_events(env: &TestEnv, event_type: &str) -> Vec<courier::store::outbox::OutboxRow> {
    env.outbox_rows(event_type).await
}

#[tokio::test]
async fn a_completed_refund_shows_as_refunded_on_the_order() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let (consumer, api) = running(&env).await;
    let (order, canceled) = env.cancel_new_order("pay-status-ok").await;

    let shown = refund_status_shown(&api, order).await;
    assert_eq!(shown["status"], "refunded", "{shown}");
    let completed = refund_events(&env, RefundCompleted::TYPE).await;
    assert_eq!(completed.len(), 1);
    let row = &completed[0];
    assert_eq!(row.aggregate_id, order.to_string());
    assert_eq!(
        row.correlation_id.as_deref(),
        Some(canceled.to_string().as_str()),
        "the refund names the request it answers"
    );
    assert!(row.published_at.is_some(), "relayed by the refund side");
    let refund = env.count("SELECT count(*) FROM refunds").await;
    assert_eq!(refund, 1);
    assert_eq!(
        row.payload["gateway_refund_id"],
        env.gateway_ledger().await[0].refund_id
    );
    api.stop().await?;
    consumer.stop().await
}

#[tokio::test]
async fn a_refund_and_its_refund_completed_event_commit_together() -> anyhow::Result<()> {
    // Later tiers long enough to lift the refusal before the refund is given up on.
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default(
            "topology.retry_delays",
            ["300ms", "3s", "3s"],
        ))
    })
    .await;
    // The outbox refuses the event: the refund's transaction must fail with it.
    env.execute(
        "CREATE FUNCTION refuse_completion() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.event_type = 'refund.completed' THEN \
         RAISE EXCEPTION 'refund.completed refused by the test'; END IF; RETURN NEW; END $$",
    )
    .await;
    env.execute(
        "CREATE TRIGGER refuse_completion BEFORE INSERT ON outbox \
         FOR EACH ROW EXECUTE FUNCTION refuse_completion()",
    )
    .await;
    let consumer = env.start_consumer().await;
    env.cancel_new_order("pay-status-atomic").await;
    env.relay().relay_once().await?;
    wait_until("the refund's commit failed once", SETTLE, async || {
        consumer_stats(&consumer)
            .await
            .get("refunds")
            .is_some_and(|s| s.retried[0].1 >= 1)
    })
    .await;
    assert_eq!(
        env.count("SELECT count(*) FROM refunds").await,
        0,
        "no refund without its event"
    );

    env.execute("DROP TRIGGER refuse_completion ON outbox")
        .await;
    wait_until(
        "the refund and its event are recorded",
        SETTLE,
        async || env.count("SELECT count(*) FROM refunds").await == 1,
    )
    .await;
    assert_eq!(refund_events(&env, RefundCompleted::TYPE).await.len(), 1);
    assert_eq!(
        env.gateway_ledger().await.len(),
        1,
        "one refund at the gateway"
    );
    consumer.stop().await
}

#[tokio::test]
async fn a_refund_refused_by_the_gateway_shows_as_refund_failed_with_the_reason()
-> anyhow::Result<()> {
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default(
            "gateway_simulator.failing_payment_ids",
            ["pay-status-refused"],
        ))
    })
    .await;
    let (consumer, api) = running(&env).await;
    let (order, canceled) = env.cancel_new_order("pay-status-refused").await;

    let shown = refund_status_shown(&api, order).await;
    assert_eq!(shown["status"], "refund_failed", "{shown}");
    let reason = shown["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("422") && reason.contains("cannot be refunded"),
        "{reason}"
    );
    let failed = refund_events(&env, RefundFailed::TYPE).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(
        failed[0].payload["dead_lettered_message_id"],
        canceled.to_string()
    );
    assert_eq!(env.queue_depth("refunds.dead").await, 1);
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM processed_messages WHERE consumer = 'refunds' AND message_id = '{canceled}'"
        ))
        .await,
        0,
        "a shelved request is not processed: its replay must still refund"
    );
    api.stop().await?;
    consumer.stop().await
}

/// A dead letter back into its work queue as an operator replays it: same
/// message id and body, our failure headers dropped so it starts afresh.
async fn replay_dead_letter(env: &TestEnv, message: &lapin::message::BasicGetMessage) {
    let original = &message.delivery.properties;
    let mut kept = FieldTable::default();
    if let Some(table) = original.headers() {
        for (key, value) in table.inner() {
            if ![
                headers::ATTEMPT,
                headers::ERROR_KIND,
                headers::LAST_ERROR,
                headers::FIRST_FAILED_AT,
            ]
            .contains(&key.as_str())
            {
                kept.insert(key.clone(), value.clone());
            }
        }
    }
    let properties = BasicProperties::default()
        .with_message_id(original.message_id().clone().unwrap_or_default())
        .with_type(original.kind().clone().unwrap_or_default())
        .with_content_type(envelope::CONTENT_TYPE_JSON.into())
        .with_delivery_mode(2)
        .with_headers(kept);
    env.publish_raw("refunds", &message.delivery.data, properties)
        .await;
}

#[tokio::test]
async fn an_exhausted_refund_shows_as_refund_failed_and_its_replay_refunds_it() -> anyhow::Result<()>
{
    let env = TestEnv::new().await;
    let (consumer, api) = running(&env).await;
    // The gateway fails this payment's first four attempts: the first try and
    // all three tiers. The fifth, the replay's, succeeds.
    let (order, _) = env.cancel_new_order("fail-4x-status").await;

    let shown = refund_status_shown(&api, order).await;
    assert_eq!(shown["status"], "refund_failed", "{shown}");
    let reason = shown["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("gave up after 4 attempts"), "{reason}");

    let dead = env.take_within("refunds.dead", SETTLE).await;
    assert_eq!(
        header_text(&dead, headers::ERROR_KIND).as_deref(),
        Some("transient")
    );
    replay_dead_letter(&env, &dead).await;
    wait_until("the replay refunds the order", SETTLE, async || {
        env.count(&format!(
            "SELECT count(*) FROM orders WHERE id = '{order}' AND refund_status = 'refunded'"
        ))
        .await
            == 1
    })
    .await;
    assert_eq!(env.count("SELECT count(*) FROM refunds").await, 1);
    assert_eq!(env.gateway_ledger().await.len(), 1);
    api.stop().await?;
    consumer.stop().await
}

#[tokio::test]
async fn a_refund_shelved_twice_raises_refund_failed_once() -> anyhow::Result<()> {
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default(
            "gateway_simulator.failing_payment_ids",
            ["pay-status-twice"],
        ))
    })
    .await;
    let (_, canceled) = env.cancel_new_order("pay-status-twice").await;
    // The same request twice, as a redelivery after a lost ack would bring it.
    let row = env
        .outbox_rows("order.canceled")
        .await
        .into_iter()
        .find(|r| r.event_id == canceled.as_uuid())
        .ok_or_else(|| anyhow::anyhow!("no outbox row"))?;
    env.publish_row("refunds", &row).await;
    env.publish_row("refunds", &row).await;
    let consumer = env.start_consumer().await;
    wait_until("both copies are shelved", SETTLE, async || {
        env.queue_depth("refunds.dead").await == 2
    })
    .await;
    assert_eq!(
        refund_events(&env, RefundFailed::TYPE).await.len(),
        1,
        "one refund.failed for one request"
    );
    consumer.stop().await
}

#[tokio::test]
async fn refund_failed_never_overwrites_refunded_whatever_order_they_arrive_in()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let (a, _) = env.cancel_new_order("pay-converge-a").await;
    let (b, _) = env.cancel_new_order("pay-converge-b").await;
    let (c, _) = env.cancel_new_order("pay-converge-c").await;
    let now = Utc::now();
    let completed = |order: OrderId| -> anyhow::Result<_> {
        let payment = courier::domain::PaymentId::parse("pay-converge")?;
        let amount = courier::domain::AmountCents::parse(1999)?;
        Ok(RefundCompleted::of(order, payment, amount, "rf_1".into(), now).to_record()?)
    };
    let failed = |order: OrderId, reason: &str, at: chrono::DateTime<Utc>| {
        RefundFailed::of(EventId::generate(), order, reason, at).to_record()
    };
    let late = now + TimeDelta::seconds(5);
    let arrivals = [
        // a: completed, then a late failure.
        completed(a)?,
        failed(a, "late", late)?,
        // b: a failure, then the completion (a replay that worked).
        failed(b, "first", now)?,
        completed(b)?,
        // c: two failures, the newer first.
        failed(c, "newer", late)?,
        failed(c, "older", now)?,
    ];
    for record in &arrivals {
        publish_record_into(&env.publisher, "orders.refund-status", record).await?;
    }
    let api = env.start_producer().await;
    wait_until("every report is recorded", SETTLE, async || {
        env.count("SELECT count(*) FROM processed_messages WHERE consumer = 'orders.refund-status'")
            .await
            == 6
    })
    .await;
    assert_eq!(refund_status_shown(&api, a).await["status"], "refunded");
    assert_eq!(refund_status_shown(&api, b).await["status"], "refunded");
    let c_status = refund_status_shown(&api, c).await;
    assert_eq!(c_status["status"], "refund_failed");
    assert_eq!(
        c_status["reason"], "newer",
        "the newer failure's reason stays"
    );
    api.stop().await
}

#[tokio::test]
async fn a_refund_report_for_an_unknown_order_is_dead_lettered_and_changes_nothing()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let ghost = RefundFailed::of(EventId::generate(), OrderId::generate(), "x", Utc::now());
    publish_record_into(&env.publisher, "orders.refund-status", &ghost.to_record()?).await?;
    let api = env.start_producer().await;
    let dead = env.take_within("orders.refund-status.dead", SETTLE).await;
    assert_eq!(
        header_text(&dead, headers::ERROR_KIND).as_deref(),
        Some("permanent")
    );
    assert!(header_text(&dead, headers::LAST_ERROR).is_some_and(|e| e.contains("does not exist")));
    assert_eq!(
        env.count("SELECT count(*) FROM processed_messages").await,
        0,
        "not recorded as processed"
    );
    api.stop().await
}
