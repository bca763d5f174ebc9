//! The order service hands each cancel batch's committed events straight to
//! its relay, which publishes them without a claim query; a row is still
//! held by one step at a time, and the claims stay the way for every row the
//! hand-off does not take.

use std::{sync::Arc, time::Duration};

use courier::{
    http::{CancelBatching, CancelQueue},
    outbox::RelayOutcome,
    store::cancel_batch::CancelRequest,
};
use figment::providers::Serialized;

use crate::{
    helpers::{TestEnv, release_row_lock, wait_until},
    relay::{bind_refunds_again, outbox_row, relay_until_one_is_published, unbind},
};

const ONE_AT_A_TIME: CancelBatching = CancelBatching {
    max: 1,
    in_flight: 1,
};

#[tokio::test]
async fn a_committed_cancel_is_handed_to_the_relay_and_published_without_a_claim()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let relay = env.relay();
    let queue = CancelQueue::spawn(env.db.clone(), ONE_AT_A_TIME, Some(relay.handoff()));
    let order = env.place_order("pay-handoff-1").await;
    let (_, event_id) = queue
        .cancel(CancelRequest {
            id: order.id,
            correlation_id: Some("handoff".into()),
        })
        .await?;

    // The hand-off holds the row, so a claim leaves it out ...
    assert_eq!(relay.relay_once().await?, RelayOutcome::Idle);
    assert!(outbox_row(&env, event_id).await.published_at.is_none());
    // ... and the handed step publishes it without one.
    assert_eq!(
        relay.relay_handed_once().await?,
        RelayOutcome::Published {
            published: 1,
            failed: 0
        }
    );
    assert!(outbox_row(&env, event_id).await.published_at.is_some());
    assert_eq!(
        relay
            .stats()
            .handed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let message = env.take_within("refunds", Duration::from_secs(5)).await;
    let properties = &message.delivery.properties;
    let text = |value: &Option<lapin::types::ShortString>| value.as_ref().map(|v| v.to_string());
    assert_eq!(text(properties.message_id()), Some(event_id.to_string()));
    assert_eq!(
        text(properties.correlation_id()),
        Some("handoff".to_owned()),
        "the handed row carries what a claimed one does"
    );
    assert_eq!(relay.relay_handed_once().await?, RelayOutcome::Idle);
    assert_eq!(relay.relay_once().await?, RelayOutcome::Idle);
    Ok(())
}

/// A claim that took a row first (its commit woke a claim before the writer
/// handed it over) holds it: the hand-off does not publish it a second time.
#[tokio::test]
async fn a_row_a_claim_took_first_is_not_published_again_from_the_handoff() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let relay = Arc::new(env.relay());
    let (_, event_id) = env.cancel_new_order("pay-handoff-raced").await;
    let mut holder = env
        .lock_rows(&format!(
            "SELECT 1 FROM outbox WHERE event_id = '{event_id}' FOR UPDATE"
        ))
        .await?;
    let claim = tokio::spawn({
        let relay = relay.clone();
        async move { relay.relay_once().await }
    });
    env.wait_for_lock_waiters(1, "the claim's mark waits on the row lock")
        .await;

    relay.handoff().hand([outbox_row(&env, event_id).await]);
    assert_eq!(relay.relay_handed_once().await?, RelayOutcome::Idle);

    release_row_lock(&mut holder).await?;
    assert_eq!(
        claim.await??,
        RelayOutcome::Published {
            published: 1,
            failed: 0
        }
    );
    env.take_within("refunds", Duration::from_secs(5)).await;
    assert_eq!(env.queue_depth("refunds").await, 0, "published once");
    Ok(())
}

/// A handed step whose publish fails leaves its rows pending, and a claim
/// publishes them once they are due again.
#[tokio::test]
async fn a_handed_row_whose_publish_failed_is_claimed_when_due_again() -> anyhow::Result<()> {
    let env = TestEnv::with(|f| f.merge(Serialized::default("relay.backoff_base", "100ms"))).await;
    let relay = env.relay();
    relay.connect().await?;
    let queue = CancelQueue::spawn(env.db.clone(), ONE_AT_A_TIME, Some(relay.handoff()));
    // Nothing at all may take the event: no work queue and no catch-all queue.
    unbind(&env, "refunds", "orders.events", "order.canceled").await;
    unbind(&env, "notifications", "orders.events", "order.canceled").await;
    unbind(&env, "orders.unrouted", "orders.unrouted", "").await;
    let order = env.place_order("pay-handoff-returned").await;
    let (_, event_id) = queue
        .cancel(CancelRequest {
            id: order.id,
            correlation_id: None,
        })
        .await?;
    // Unbound, the event is returned by the broker (`mandatory`).
    assert_eq!(
        relay.relay_handed_once().await?,
        RelayOutcome::Published {
            published: 0,
            failed: 1
        }
    );
    let row = outbox_row(&env, event_id).await;
    assert!(row.published_at.is_none() && row.last_error.is_some());
    bind_refunds_again(&env).await;
    relay_until_one_is_published(&relay).await;
    assert!(outbox_row(&env, event_id).await.published_at.is_some());
    Ok(())
}

/// The running order service's relay takes its cancels from the hand-off,
/// with the poll an hour away, and says so in `/metrics`.
#[tokio::test]
async fn the_order_service_publishes_its_cancels_from_the_handoff() -> anyhow::Result<()> {
    let env = TestEnv::with(|f| f.merge(Serialized::default("relay.poll_interval", "1h"))).await;
    let producer = env.start_producer().await;
    let base = format!("http://{}", producer.addr);
    let client = reqwest::Client::new();
    let cancel = async |n: usize| -> anyhow::Result<()> {
        let order = env.place_order(&format!("pay-handoff-api-{n}")).await;
        client
            .post(format!("{base}/orders/{}/cancel", order.id))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    };
    let published = async |n: i64| {
        wait_until(
            "the cancels are published",
            Duration::from_secs(10),
            async || {
                env.count("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
                    .await
                    == n
            },
        )
        .await;
    };
    let handed = async || -> anyhow::Result<f64> {
        let metrics = reqwest::get(format!("{base}/metrics"))
            .await?
            .text()
            .await?;
        metrics
            .lines()
            .find_map(|line| {
                line.strip_prefix(r#"courier_relay_handed_total{publisher="orders"} "#)
            })
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no handed counter in {metrics}"))
    };
    // The relay's start-up claim, which looks for rows left from before,
    // is over once a first cancel is out.
    cancel(0).await?;
    published(1).await;
    let before = handed().await?;
    for n in 1..=3 {
        cancel(n).await?;
    }
    published(4).await;
    assert_eq!(handed().await? - before, 3.0);
    producer.stop().await?;
    Ok(())
}
