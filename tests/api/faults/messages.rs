//! Bad and hostile messages during a run: poison, a consumer-crashing
//! message, a duplicate storm.

use std::{collections::HashSet, time::Duration};

use courier::store;
use figment::providers::Serialized;
use lapin::BasicProperties;

use super::harness::{CONSUMER, GATEWAY, PRODUCER, Run, assert_passed};
use crate::helpers::json_properties;

const SETTLE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn poison_messages_are_dead_lettered_at_once_and_the_run_is_unaffected() {
    let mut run =
        Run::new(|f| f.merge(Serialized::default("consumer.max_body_bytes", 1024 * 1024))).await;
    run.start_all().await;
    let mut orders: HashSet<_> = run
        .cancel_orders(10, "pay-poison-a")
        .await
        .into_iter()
        .collect();
    let poison: Vec<(BasicProperties, Vec<u8>, &str)> = vec![
        (
            json_properties(),
            b"{\"order_id\": nope".to_vec(),
            "not a valid `order.canceled`",
        ),
        (
            json_properties().with_content_type("text/plain".into()),
            b"{}".to_vec(),
            "unsupported content type",
        ),
        (
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_type("order.canceled".into()),
            b"{}".to_vec(),
            "missing message id",
        ),
        (
            json_properties().with_type("order.vanished".into()),
            b"{}".to_vec(),
            "unknown event type",
        ),
        (
            json_properties(),
            vec![b'x'; 10 * 1024 * 1024],
            "exceeds the limit",
        ),
    ];
    for (properties, body, _) in &poison {
        run.env
            .publish_raw("refunds", body, properties.clone())
            .await;
    }
    orders.extend(run.cancel_orders(10, "pay-poison-b").await);
    let report = run.settle(&orders, SETTLE).await;
    assert_passed(&report, "poison during a run");
    assert_eq!(report.refunded, 20, "every real order is refunded");

    let letters = courier::check::peek_dead_letters(&run.env.broker, "refunds.dead")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for (_, _, reason) in &poison {
        assert!(
            letters
                .iter()
                .any(|l| l.kind == "poison"
                    && l.error.as_deref().is_some_and(|e| e.contains(reason))),
            "no poison dead letter with `{reason}`: {letters:?}"
        );
    }
    assert_eq!(
        run.starts(CONSUMER),
        1,
        "the consumer never crashed on poison"
    );
}

#[tokio::test]
async fn a_message_that_crashes_the_consumer_every_time_is_stopped_by_the_delivery_limit() {
    let mut run = Run::new(|f| f.merge(Serialized::default("topology.delivery_limit", 2))).await;
    for name in [GATEWAY, PRODUCER] {
        run.spawn(name).await;
    }
    let orders: Vec<_> = run.cancel_orders(1, "pay-crasher").await;
    let mut conn = run.env.conn().await;
    let event_id: uuid::Uuid = {
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        store::schema::outbox::table
            .select(store::schema::outbox::event_id)
            .first(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    run.set_env(
        CONSUMER,
        &[("COURIER_CRASH_ON_MESSAGE", &event_id.to_string())],
    );
    run.spawn(CONSUMER).await;
    let scope = orders.into_iter().collect();
    let report = run.settle(&scope, SETTLE).await;
    assert_passed(&report, "crash loop");
    assert_eq!(
        report.dead_lettered.get("delivery-limit"),
        Some(&1),
        "{report:?}"
    );
    assert!(
        run.starts(CONSUMER) >= 3,
        "the message crashed the consumer each time: {:?}",
        run.pids
    );
}

#[tokio::test]
async fn a_duplicate_storm_makes_one_refund_per_order() {
    let mut run = Run::new(|f| f).await;
    run.start_all().await;
    let orders: HashSet<_> = run
        .cancel_orders(15, "pay-storm")
        .await
        .into_iter()
        .collect();
    // Every event published twice more, straight to the events exchange.
    run.republish_all_events().await;
    run.republish_all_events().await;
    let report = run.settle(&orders, SETTLE).await;
    assert_passed(&report, "duplicate storm");
    assert_eq!(report.refunded, 15);
    assert_eq!(report.refunds_in_gateway, 15);
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let stats = run.consumer_stats().await;
        if stats["refunds"].duplicates == 30 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "duplicates absorbed: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
