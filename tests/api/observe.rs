//! Observability: the services' `/metrics` move as the pipeline runs,
//! `/readyz` tells a stopped broker apart from a live process, and every
//! log line about a message says which consumer, event and order it is about.

use std::time::Duration;

use figment::providers::Serialized;
use serde_json::Value;

use crate::{
    faults::harness::{CONSUMER, GATEWAY, PRODUCER, Run, assert_passed},
    helpers::{Service, TestEnv, wait_until},
    support::BrokerNode,
};

const SETTLE: Duration = Duration::from_secs(30);

async fn get(service: &Service, path: &str) -> anyhow::Result<(u16, String)> {
    let response = reqwest::get(format!("http://{}{path}", service.addr)).await?;
    Ok((response.status().as_u16(), response.text().await?))
}

/// The value of the sample `series` (name with its labels, as printed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn scrape(service: &Service) -> anyhow::Result<String> {
    let (status, text) = get(service, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}: {text}");
    Ok(text)
}

#[tokio::test]
async fn metrics_counters_move_as_the_pipeline_runs() -> anyhow::Result<()> {
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default(
            "gateway_simulator.failing_payment_ids",
            ["pay-never-metrics"],
        ))
    })
    .await;
    let consumer = env.start_consumer().await;
    let producer = env.start_producer().await;
    let before = scrape(&consumer).await?;
    assert_eq!(
        sample(
            &before,
            r#"courier_consumer_consumed_total{worker="refunds"}"#
        ),
        Some(0.0),
        "{before}"
    );

    for payment in ["pay-ok-metrics", "fail-1x-metrics", "pay-never-metrics"] {
        env.cancel_new_order(payment).await;
    }
    wait_until("two refunds and one dead letter", SETTLE, async || {
        env.count("SELECT count(*) FROM refunds").await == 2
            && env.queue_depth("refunds.dead").await == 1
    })
    .await;

    // Two refund.completed and one refund.failed come back to the order
    // service through the consumer's refund relay.
    wait_until(
        "three refund reports recorded on the orders",
        SETTLE,
        async || {
            env.count("SELECT count(*) FROM orders WHERE refund_status IS NOT NULL")
                .await
                == 3
        },
    )
    .await;
    let relay = scrape(&producer).await?;
    for (series, at_least) in [
        (r#"courier_relay_published_total{publisher="orders"}"#, 3.0),
        (r#"courier_relay_confirmed_total{publisher="orders"}"#, 3.0),
        (
            r#"courier_consumer_handled_total{worker="orders.refund-status"}"#,
            1.0,
        ),
    ] {
        assert!(
            sample(&relay, series).is_some_and(|v| v >= at_least),
            "{series} in {relay}"
        );
    }
    assert_eq!(
        sample(&relay, r#"courier_relay_nacked_total{publisher="orders"}"#),
        Some(0.0)
    );
    assert_eq!(sample(&relay, "courier_database_up"), Some(1.0));
    assert_eq!(
        sample(&relay, r#"courier_outbox_pending{publisher="orders"}"#),
        Some(0.0),
        "{relay}"
    );
    assert_eq!(
        sample(
            &relay,
            r#"courier_outbox_oldest_pending_age_seconds{publisher="orders"}"#
        ),
        Some(0.0)
    );

    let text = scrape(&consumer).await?;
    let statements = |text: &str| sample(text, "courier_database_statements_total");
    assert!(
        statements(&text) > statements(&before) && statements(&before).is_some(),
        "the statements sent to PostgreSQL: {:?} then {:?}",
        statements(&before),
        statements(&text)
    );
    assert!(
        sample(
            &text,
            r#"courier_relay_confirmed_total{publisher="refunds"}"#
        )
        .is_some_and(|v| v >= 3.0),
        "the refund relay's confirms in {text}"
    );
    for (series, expected) in [
        (r#"courier_consumer_consumed_total{worker="refunds"}"#, 4.0),
        (r#"courier_consumer_acked_total{worker="refunds"}"#, 4.0),
        (r#"courier_consumer_handled_total{worker="refunds"}"#, 2.0),
        (
            r#"courier_consumer_retried_total{worker="refunds",queue="refunds.retry.200ms"}"#,
            1.0,
        ),
        (
            r#"courier_consumer_dead_lettered_total{worker="refunds",reason="permanent"}"#,
            1.0,
        ),
        (
            r#"courier_consumer_duplicates_absorbed_total{worker="refunds"}"#,
            0.0,
        ),
        (
            r#"courier_consumer_handler_duration_seconds_count{worker="refunds"}"#,
            4.0,
        ),
    ] {
        assert_eq!(sample(&text, series), Some(expected), "{series} in {text}");
    }
    assert!(text.contains("# TYPE courier_consumer_handler_duration_seconds histogram"));

    for service in [&consumer, &producer] {
        assert_eq!(get(service, "/healthz").await?.0, 200);
        let (status, body) = get(service, "/readyz").await?;
        assert_eq!(status, 200, "{body}");
        let readiness: Value = serde_json::from_str(&body)?;
        assert_eq!(readiness["broker"], "ok");
        assert_eq!(readiness["database"], "ok");
    }
    producer.stop().await?;
    consumer.stop().await
}

#[tokio::test]
async fn readyz_is_unready_while_the_broker_is_stopped_and_healthz_stays_up() -> anyhow::Result<()>
{
    let mut broker = BrokerNode::start().await;
    let port = broker.amqp_port();
    let management = broker.management_url();
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default("amqp.port", port))
            .merge(Serialized::default("amqp.vhost", "/"))
            .merge(Serialized::default("amqp.management_url", &management))
            .merge(Serialized::default("amqp.heartbeat", "2s"))
    })
    .await;
    let consumer = env.start_consumer().await;
    let producer = env.start_producer().await;
    let ready =
        async |service: &Service| get(service, "/readyz").await.map(|(s, _)| s).unwrap_or(0);
    wait_until("both services are ready", SETTLE, async || {
        ready(&consumer).await == 200 && ready(&producer).await == 200
    })
    .await;

    broker.stop_app().await;
    wait_until(
        "both services report the broker unreachable",
        SETTLE,
        async || ready(&consumer).await == 503 && ready(&producer).await == 503,
    )
    .await;
    for service in [&consumer, &producer] {
        let (_, body) = get(service, "/readyz").await?;
        let readiness: Value = serde_json::from_str(&body)?;
        assert_eq!(readiness["ready"], false);
        assert_ne!(readiness["broker"], "ok", "{body}");
        assert_eq!(readiness["database"], "ok", "{body}");
        assert_eq!(
            get(service, "/healthz").await?.0,
            200,
            "the process is still up"
        );
    }

    broker.start_app().await;
    wait_until(
        "both services are ready again",
        Duration::from_secs(60),
        async || ready(&consumer).await == 200 && ready(&producer).await == 200,
    )
    .await;
    producer.stop().await?;
    consumer.stop().await
}

#[tokio::test]
async fn every_log_line_about_a_message_carries_its_consumer_event_and_order_in_json()
-> anyhow::Result<()> {
    let mut run = Run::new(|f| {
        f.merge(Serialized::default(
            "gateway_simulator.failing_payment_ids",
            ["pay-never-json-0"],
        ))
    })
    .await;
    run.set_env(CONSUMER, &[("COURIER__LOG__FORMAT", "json")]);
    run.set_env(PRODUCER, &[("COURIER__LOG__FORMAT", "json")]);
    for name in [GATEWAY, CONSUMER, PRODUCER] {
        run.spawn(name).await;
    }
    let mut orders = run.cancel_orders(1, "pay-never-json").await;
    orders.extend(run.cancel_orders(1, "fail-1x-json").await);
    let report = run
        .settle(&orders.iter().copied().collect(), Duration::from_secs(60))
        .await;
    assert_passed(&report, "json logs");
    run.wait_for_log(
        CONSUMER,
        "dead-lettered",
        "the permanent failure was logged",
    )
    .await;

    let log = std::fs::read_to_string(run.log_path(CONSUMER))?;
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("every line is JSON: {e}\n{log}"))?;
    let about = |message: &str| -> Vec<&Value> {
        lines.iter().filter(|l| l["message"] == message).collect()
    };
    let (dead, retried) = (about("dead-lettered"), about("retrying later"));
    assert_eq!((dead.len(), retried.len()), (1, 1), "{log}");
    for line in dead.iter().chain(&retried) {
        assert_eq!(line["consumer"], "refunds", "{line}");
        let order = line["order_id"].as_str().unwrap_or_default();
        assert!(orders.iter().any(|o| o.to_string() == order), "{line}");
        assert!(
            uuid::Uuid::parse_str(line["event_id"].as_str().unwrap_or_default()).is_ok(),
            "{line}"
        );
    }
    for line in lines.iter().filter(|l| l.get("event_id").is_some()) {
        assert!(
            line.get("order_id").is_some() && line.get("consumer").is_some(),
            "{line}"
        );
    }
    Ok(())
}

/// Cancels held behind a batch that waits on a row lock show up in the order
/// service's `courier_cancels_queued`, and leave it when they are written.
#[tokio::test]
async fn queued_cancels_show_in_the_order_services_metrics() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let producer = env.start_producer().await;
    let blocker = env.place_order("pay-queued-blocker").await;
    let mut waiting = Vec::new();
    for n in 0..3 {
        waiting.push(env.place_order(&format!("pay-queued-{n}")).await.id);
    }
    let mut holder = env.lock_order_row(&blocker.id.to_string()).await?;
    let cancel = |id: courier::domain::OrderId| {
        let url = format!("http://{}/orders/{id}/cancel", producer.addr);
        tokio::spawn(async move { reqwest::Client::new().post(url).send().await })
    };
    let first = cancel(blocker.id);
    env.wait_for_lock_waiters(1, "the first batch waits for the order's row lock")
        .await;
    let queued: Vec<_> = waiting.iter().map(|id| cancel(*id)).collect();
    let mut seen = None;
    wait_until(
        "three cancels are queued behind the held batch",
        Duration::from_secs(10),
        async || {
            seen = match scrape(&producer).await {
                Ok(text) => sample(&text, "courier_cancels_queued"),
                Err(_) => None,
            };
            seen == Some(3.0)
        },
    )
    .await;

    crate::helpers::release_row_lock(&mut holder).await?;
    for request in std::iter::once(first).chain(queued) {
        let status = request.await??.status();
        anyhow::ensure!(status == 200, "a queued cancel answered {status}");
    }
    let text = scrape(&producer).await?;
    assert_eq!(sample(&text, "courier_cancels_queued"), Some(0.0), "{text}");
    producer.stop().await?;
    Ok(())
}
