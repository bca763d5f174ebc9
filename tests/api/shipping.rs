//! Shipping info: the API that changes it (one statement with its event, as
//! cancel), and P9: the shipping-sync read model converges to the last write
//! whatever order the events arrive in.

use std::time::Duration;

use courier::{
    domain::{OrderId, ShippingInfoChanged},
    store,
};
use figment::providers::Serialized;
use serde_json::{Value, json};

use crate::helpers::{TestEnv, consumer_stats, wait_until};

const SETTLE: Duration = Duration::from_secs(30);

async fn put(url: &str, body: Value) -> anyhow::Result<(u16, Value)> {
    let response = reqwest::Client::new().put(url).json(&body).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

async fn post(url: &str) -> anyhow::Result<u16> {
    Ok(reqwest::Client::new()
        .post(url)
        .send()
        .await?
        .status()
        .as_u16())
}

/// The read model's row for `order`: (address, applied version).
async fn shipment(env: &TestEnv, order: OrderId) -> Option<(String, i64)> {
    let mut conn = env.conn().await;
    store::shipments::find(&mut conn, order.as_uuid())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn changing_the_shipping_address_raises_shipping_info_changed_with_the_grown_version()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let api = env.start_producer().await;
    let base = format!("http://{}", api.addr);
    let order = env.place_order("pay-ship-1").await;

    let url = format!("{base}/orders/{}/shipping-info", order.id);
    let (status, body) = put(&url, json!({"shipping_address": "1 Main St\nLondon"})).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["order"]["shipping_address"], "1 Main St\nLondon");
    assert_eq!(body["order"]["version"], 2);
    let event_id = body["event_id"].as_str().unwrap_or_default().to_owned();

    let rows = env.outbox_rows(ShippingInfoChanged::TYPE).await;
    assert_eq!(rows.len(), 1, "one event, written with the change");
    let row = &rows[0];
    assert_eq!(row.event_id.to_string(), event_id);
    assert_eq!(row.aggregate_id, order.id.to_string());
    assert_eq!(
        row.aggregate_version, 2,
        "the event carries the grown version"
    );
    assert_eq!(row.payload["shipping_address"], "1 Main St\nLondon");
    assert_eq!(row.payload["order_version"], 2);

    let shown: Value = reqwest::get(format!("{base}/orders/{}", order.id))
        .await?
        .json()
        .await?;
    assert_eq!(shown["shipping_address"], "1 Main St\nLondon");
    api.stop().await
}

#[tokio::test]
async fn putting_the_same_shipping_address_again_raises_no_event() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let api = env.start_producer().await;
    let order = env.place_order("pay-ship-same").await;
    let url = format!("http://{}/orders/{}/shipping-info", api.addr, order.id);
    let body = json!({"shipping_address": "1 Main St"});
    let (first, _) = put(&url, body.clone()).await?;
    let (again, answer) = put(&url, body).await?;
    assert_eq!((first, again), (200, 200));
    assert_eq!(answer["event_id"], Value::Null, "{answer}");
    assert_eq!(answer["order"]["version"], 2);
    assert_eq!(env.outbox_rows(ShippingInfoChanged::TYPE).await.len(), 1);
    api.stop().await
}

#[tokio::test]
async fn changing_the_address_of_a_shipped_or_canceled_order_is_a_409_with_the_reason_and_writes_no_event()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let api = env.start_producer().await;
    let base = format!("http://{}", api.addr);
    let shipped = env.place_order("pay-ship-shipped").await;
    assert_eq!(
        post(&format!("{base}/orders/{}/ship", shipped.id)).await?,
        200
    );
    let (canceled, _) = env.cancel_new_order("pay-ship-canceled").await;

    for (order, reason) in [(shipped.id, "already shipped"), (canceled, "is canceled")] {
        let (status, body) = put(
            &format!("{base}/orders/{order}/shipping-info"),
            json!({"shipping_address": "1 Main St"}),
        )
        .await?;
        assert_eq!(status, 409, "{body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains(reason)),
            "{body}"
        );
    }
    assert_eq!(env.outbox_rows(ShippingInfoChanged::TYPE).await.len(), 0);
    api.stop().await
}

#[tokio::test]
async fn a_bad_shipping_info_request_is_a_4xx_that_says_what_is_wrong() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let api = env.start_producer().await;
    let base = format!("http://{}", api.addr);
    let order = env.place_order("pay-ship-bad").await;
    let url = format!("{base}/orders/{}/shipping-info", order.id);
    for (body, status, says) in [
        (json!({}), 422, "shipping_address"),
        (json!({"shipping_address": 7}), 422, "shipping_address"),
        (json!({"shipping_address": "  "}), 422, "shipping_address"),
        (
            json!({"shipping_address": "1 Main\u{0} St"}),
            422,
            "control characters",
        ),
        (json!({"shipping_address": "x", "city": "y"}), 422, "city"),
    ] {
        let (got, answer) = put(&url, body.clone()).await?;
        assert_eq!(got, status, "{body}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| e.contains(says)),
            "{body}: {answer}"
        );
    }
    let malformed = reqwest::Client::new()
        .put(&url)
        .header("content-type", "application/json")
        .body("{\"shipping_address\": ")
        .send()
        .await?;
    assert_eq!(malformed.status().as_u16(), 400);
    let (unknown, _) = put(
        &format!("{base}/orders/{}/shipping-info", uuid::Uuid::now_v7()),
        json!({"shipping_address": "1 Main St"}),
    )
    .await?;
    assert_eq!(unknown, 404);
    let (bad_id, answer) = put(
        &format!("{base}/orders/nope/shipping-info"),
        json!({"shipping_address": "1 Main St"}),
    )
    .await?;
    assert_eq!(bad_id, 400, "{answer}");
    assert_eq!(env.outbox_rows(ShippingInfoChanged::TYPE).await.len(), 0);
    api.stop().await
}

/// An order whose address changed `n` times (versions 2..=n+1); its events.
async fn order_with_changes(env: &TestEnv, n: usize) -> (OrderId, Vec<store::outbox::OutboxRow>) {
    let order = env.place_order("pay-ship-p9").await;
    for i in 1..=n {
        env.change_address(order.id, &format!("{i} Change St"))
            .await;
    }
    (order.id, env.outbox_rows(ShippingInfoChanged::TYPE).await)
}

#[tokio::test]
async fn shipping_changes_published_in_reverse_converge_to_the_last_write() -> anyhow::Result<()> {
    // One batch at a time, so the queue's order is the order applied: two
    // batches in flight at once may commit either way round (the read model
    // still converges, but "newest first" would no longer be what we test).
    let env = TestEnv::with(|f| f.merge(Serialized::default("consumer.concurrency", 1))).await;
    let (order, rows) = order_with_changes(&env, 5).await;
    for row in rows.iter().rev() {
        env.publish_row("shipping-sync", row).await;
    }
    let consumer = env.start_consumer().await;
    wait_until("every change is settled", SETTLE, async || {
        consumer_stats(&consumer)
            .await
            .get("shipping-sync")
            .is_some_and(|s| s.handled + s.skipped == 5)
    })
    .await;
    let stats = &consumer_stats(&consumer).await["shipping-sync"];
    assert_eq!(stats.handled, 1, "the newest applied first: {stats:?}");
    assert_eq!(stats.skipped, 4, "every older one skipped: {stats:?}");
    assert_eq!(
        shipment(&env, order).await,
        Some(("5 Change St".to_owned(), 6))
    );
    consumer.stop().await
}

#[tokio::test]
async fn an_older_shipping_change_back_from_a_retry_tier_is_skipped() -> anyhow::Result<()> {
    // One delivery at a time: batched together, the older change would be
    // skipped before it reached the database.
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default("consumer.prefetch", 1))
            .merge(Serialized::default("consumer.concurrency", 1))
            .merge(Serialized::default("consumer.batch_size", 1))
    })
    .await;
    // The read model refuses the older change once (a sequence survives the
    // rollback), so it goes through a delay tier and comes back after the
    // newer one was applied.
    env.execute("CREATE SEQUENCE refuse_once").await;
    env.execute(
        "CREATE FUNCTION refuse_once() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.shipping_address = '1 Early St' AND nextval('refuse_once') = 1 THEN \
         RAISE EXCEPTION 'refused once by the test'; END IF; RETURN NEW; END $$",
    )
    .await;
    env.execute(
        "CREATE TRIGGER refuse_once BEFORE INSERT OR UPDATE ON shipments \
         FOR EACH ROW EXECUTE FUNCTION refuse_once()",
    )
    .await;
    let order = env.place_order("pay-ship-tier").await;
    env.change_address(order.id, "1 Early St").await;
    env.change_address(order.id, "2 Later St").await;
    let consumer = env.start_consumer().await;
    env.relay().relay_once().await?;

    wait_until("both changes are settled", SETTLE, async || {
        consumer_stats(&consumer)
            .await
            .get("shipping-sync")
            .is_some_and(|s| s.handled + s.skipped == 2)
    })
    .await;
    let stats = &consumer_stats(&consumer).await["shipping-sync"];
    assert_eq!(
        stats.retried[0].1, 1,
        "the older change went through a tier: {stats:?}"
    );
    assert_eq!(
        (stats.handled, stats.skipped),
        (1, 1),
        "the newer applied, the older skipped when it came back: {stats:?}"
    );
    assert_eq!(
        shipment(&env, order.id).await,
        Some(("2 Later St".to_owned(), 3))
    );
    consumer.stop().await
}

#[tokio::test]
async fn a_shipping_change_duplicate_storm_converges_to_the_last_write() -> anyhow::Result<()> {
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default("consumer.prefetch", 16))
            .merge(Serialized::default("consumer.concurrency", 16))
            .merge(Serialized::default("consumer.batch_size", 16))
    })
    .await;
    let mut orders = Vec::new();
    for o in 0..4 {
        let order = env.place_order(&format!("pay-storm-{o}")).await;
        for i in 1..=3 {
            env.change_address(order.id, &format!("{o}-{i} Storm St"))
                .await;
        }
        orders.push(order.id);
    }
    let rows = env.outbox_rows(ShippingInfoChanged::TYPE).await;
    // Every change three times, in a shuffled order: forwards, backwards,
    // and interleaved.
    let interleaved = rows.iter().step_by(2).chain(rows.iter().skip(1).step_by(2));
    for row in rows.iter().chain(rows.iter().rev()).chain(interleaved) {
        env.publish_row("shipping-sync", row).await;
    }
    let consumer = env.start_consumer().await;
    wait_until("every copy is settled", SETTLE, async || {
        consumer_stats(&consumer)
            .await
            .get("shipping-sync")
            .is_some_and(|s| s.handled + s.skipped + s.duplicates == 36)
    })
    .await;
    let stats = &consumer_stats(&consumer).await["shipping-sync"];
    assert_eq!(
        stats.duplicates, 24,
        "two copies of each absorbed: {stats:?}"
    );
    assert!(stats.largest_batch >= 2, "never batched: {stats:?}");
    for (o, order) in orders.iter().enumerate() {
        assert_eq!(
            shipment(&env, *order).await,
            Some((format!("{o}-3 Storm St"), 4)),
            "order {o}"
        );
    }
    consumer.stop().await
}
