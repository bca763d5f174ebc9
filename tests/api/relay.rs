//! P2: an event counts as sent only after the broker took it; P6: the events
//! exchange's alternate exchange catches what no queue was bound for.

use std::time::Duration;

use courier::{amqp::envelope::headers, outbox::RelayOutcome, store};
use figment::providers::Serialized;
use lapin::{
    options::{QueueBindOptions, QueuePurgeOptions},
    types::FieldTable,
};

use crate::helpers::{TestEnv, header_int, header_text, release_row_lock, wait_until};

pub(crate) async fn unbind(env: &TestEnv, queue: &str, exchange: &str, key: &str) {
    env.channel
        .queue_unbind(
            queue.into(),
            exchange.into(),
            key.into(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("unbind {queue}: {e}"));
}

/// A connected relay (so its topology declaration is done) with the work
/// queues' bindings removed afterwards.
async fn relay_with_work_queues_unbound(env: &TestEnv) -> courier::outbox::Relay {
    let relay = env.relay();
    relay.connect().await.unwrap_or_else(|e| panic!("{e}"));
    unbind(env, "refunds", "orders.events", "order.canceled").await;
    unbind(env, "notifications", "orders.events", "order.canceled").await;
    relay
}

/// Binds the `refunds` queue to the order events again.
pub(crate) async fn bind_refunds_again(env: &TestEnv) {
    env.channel
        .queue_bind(
            "refunds".into(),
            "orders.events".into(),
            "order.canceled".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Steps the relay until it publishes one row (failed rows back off first).
pub(crate) async fn relay_until_one_is_published(relay: &courier::outbox::Relay) {
    wait_until(
        "a pending row is published after its backoff",
        Duration::from_secs(10),
        async || {
            matches!(
                relay.relay_once().await,
                Ok(RelayOutcome::Published { published: 1, .. })
            )
        },
    )
    .await;
}

/// Steps the relay once and checks how many rows went out and how many failed.
async fn assert_relay_step(relay: &courier::outbox::Relay, published: usize, failed: usize) {
    let outcome = relay.relay_once().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome, RelayOutcome::Published { published, failed });
}

pub(crate) async fn outbox_row(
    env: &TestEnv,
    event_id: courier::domain::EventId,
) -> store::outbox::OutboxRow {
    let mut conn = env.conn().await;
    store::outbox::find_by_event_id(&mut conn, event_id.as_uuid())
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no outbox row for {event_id}"))
}

#[tokio::test]
async fn the_relay_marks_a_row_published_only_after_the_broker_acked_it() {
    let env = TestEnv::new().await;
    let relay = env.relay();
    let (order_id, event_id) = env.cancel_new_order("pay-relay-1").await;
    assert_eq!(
        env.queue_depth("refunds").await,
        0,
        "nothing is published inside the transaction"
    );
    assert!(outbox_row(&env, event_id).await.published_at.is_none());

    assert_relay_step(&relay, 1, 0).await;
    let row = outbox_row(&env, event_id).await;
    assert!(row.published_at.is_some());
    assert_eq!(row.attempts, 1);
    assert_eq!(relay.relay_once().await.ok(), Some(RelayOutcome::Idle));

    // The message contract (DESIGN.md §4).
    let message = env.take_within("refunds", Duration::from_secs(5)).await;
    let properties = &message.delivery.properties;
    let event_id_text = event_id.to_string();
    assert_eq!(
        properties.message_id().as_ref().map(|m| m.as_str()),
        Some(event_id_text.as_str())
    );
    assert_eq!(
        properties.kind().as_ref().map(|t| t.as_str()),
        Some("order.canceled")
    );
    assert_eq!(
        properties.content_type().as_ref().map(|t| t.as_str()),
        Some("application/json")
    );
    assert_eq!(*properties.delivery_mode(), Some(2));
    assert_eq!(
        properties.correlation_id().as_ref().map(|c| c.as_str()),
        Some("test")
    );
    assert!(properties.timestamp().is_some());
    assert_eq!(
        header_text(&message, headers::AGGREGATE_ID),
        Some(order_id.to_string())
    );
    assert_eq!(
        header_text(&message, headers::AGGREGATE_TYPE).as_deref(),
        Some("order")
    );
    assert_eq!(header_int(&message, headers::AGGREGATE_VERSION), Some(2));
    assert_eq!(header_int(&message, headers::EVENT_VERSION), Some(1));
    assert!(header_text(&message, headers::OCCURRED_AT).is_some());
    let body: serde_json::Value =
        serde_json::from_slice(&message.delivery.data).unwrap_or_default();
    assert_eq!(body["order_id"], order_id.to_string());
    assert_eq!(
        env.queue_depth("notifications").await,
        1,
        "every bound queue got its copy"
    );
}

#[tokio::test]
async fn unroutable_event_stays_in_outbox() {
    let env = TestEnv::new().await;
    // Nothing at all may take the event: no work queue and no catch-all queue.
    let relay = relay_with_work_queues_unbound(&env).await;
    unbind(&env, "orders.unrouted", "orders.unrouted", "").await;
    let (_, event_id) = env.cancel_new_order("pay-unroutable-1").await;

    assert_relay_step(&relay, 0, 1).await;
    let row = outbox_row(&env, event_id).await;
    assert!(
        row.published_at.is_none(),
        "a returned message is not published"
    );
    assert_eq!(row.attempts, 1);
    assert!(
        row.last_error
            .as_deref()
            .is_some_and(|e| e.contains("NO_ROUTE")),
        "the error is recorded: {:?}",
        row.last_error
    );

    // Once a route exists again the same row goes out.
    bind_refunds_again(&env).await;
    relay_until_one_is_published(&relay).await;
    assert!(outbox_row(&env, event_id).await.published_at.is_some());
    assert_eq!(env.queue_depth("refunds").await, 1);
}

#[tokio::test]
async fn an_event_no_queue_is_bound_for_lands_in_orders_unrouted() {
    let env = TestEnv::new().await;
    let relay = relay_with_work_queues_unbound(&env).await;
    let (_, event_id) = env.cancel_new_order("pay-unbound-1").await;

    assert_relay_step(&relay, 1, 0).await;
    let message = env
        .take_within("orders.unrouted", Duration::from_secs(5))
        .await;
    let event_id_text = event_id.to_string();
    assert_eq!(
        message
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str()),
        Some(event_id_text.as_str()),
        "the alternate exchange kept the event visible instead of dropping it"
    );
}

#[tokio::test]
async fn a_nacked_publish_stays_pending_and_is_published_after_room_is_made() {
    let env =
        TestEnv::with(|f| f.merge(Serialized::default("topology.work_queue_max_length", 1))).await;
    let relay = env.relay();
    // A quorum queue enforces its limit once it is over it, so fill it until
    // the broker refuses; a handful of events is always enough for a limit of 1.
    let mut refused = None;
    for i in 0..5 {
        let (_, event_id) = env.cancel_new_order(&format!("pay-full-{i}")).await;
        match relay.relay_once().await.unwrap_or_else(|e| panic!("{e}")) {
            RelayOutcome::Published {
                published: 1,
                failed: 0,
            } => {}
            RelayOutcome::Published {
                published: 0,
                failed: 1,
            } => {
                refused = Some(event_id);
                break;
            }
            other => panic!("unexpected relay outcome {other:?}"),
        }
    }
    let Some(event_id) = refused else {
        panic!("the full queue never refused a publish")
    };
    let row = outbox_row(&env, event_id).await;
    assert!(row.published_at.is_none());
    assert!(
        row.last_error
            .as_deref()
            .is_some_and(|e| e.contains("nacked")),
        "{:?}",
        row.last_error
    );
    let depth = env.queue_depth("refunds").await;

    for queue in ["refunds", "notifications"] {
        env.channel
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    relay_until_one_is_published(&relay).await;
    let row = outbox_row(&env, event_id).await;
    assert!(row.published_at.is_some());
    assert_eq!(row.attempts, 2);
    assert_eq!(
        env.queue_depth("refunds").await,
        1,
        "the queue held {depth} before the purge; now only the retried event"
    );
}

/// A row committed where no relay hears of it (another process, or one that
/// crashed before its relay ran) is found by the relay's poll.
#[tokio::test]
async fn an_event_committed_by_another_process_is_published_at_the_next_poll() {
    let env = TestEnv::with(|f| f.merge(Serialized::default("relay.poll_interval", "300ms"))).await;
    let producer = env.start_producer().await;
    let order = env.place_order("pay-elsewhere-1").await;
    // Raw SQL, as another process would write it: no in-process signal.
    let event_id = uuid::Uuid::now_v7();
    env.execute(&format!(
        "INSERT INTO outbox (event_id, event_type, event_version, aggregate_type, aggregate_id, \
         aggregate_version, payload, occurred_at) \
         VALUES ('{event_id}', 'order.canceled', 1, 'order', '{}', 2, '{{}}', now())",
        order.id
    ))
    .await;
    wait_until(
        "the event is published by the poll",
        Duration::from_secs(10),
        async || {
            outbox_row(&env, courier::domain::EventId::from_uuid(event_id))
                .await
                .published_at
                .is_some()
        },
    )
    .await;
    producer.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

/// The order service runs in this test's process, so a cancel committed here
/// is a commit in the relay's own process.
#[tokio::test]
async fn the_running_relay_is_woken_by_a_commit_in_its_process_without_polling() {
    let env = TestEnv::with(|f| f.merge(Serialized::default("relay.poll_interval", "1h"))).await;
    let producer = env.start_producer().await;
    // The first event may go out in the relay's start-up drain; after it the
    // relay waits, and with a one-hour poll interval only the commit's
    // signal can wake it.
    let (_, first) = env.cancel_new_order("pay-wake-1").await;
    wait_until(
        "the first event is published",
        Duration::from_secs(10),
        async || outbox_row(&env, first).await.published_at.is_some(),
    )
    .await;
    let (_, second) = env.cancel_new_order("pay-wake-2").await;
    wait_until(
        "the second event is published",
        Duration::from_secs(10),
        async || outbox_row(&env, second).await.published_at.is_some(),
    )
    .await;
    producer.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

/// While one step waits to mark its rows (here: behind a row lock, after its
/// confirms), the next step publishes the rows after them and never the
/// first step's rows again.
#[tokio::test]
async fn overlapping_relay_steps_publish_each_row_once() {
    let env = TestEnv::with(|f| f.merge(Serialized::default("relay.batch_size", 3))).await;
    let relay = std::sync::Arc::new(env.relay());
    let mut events = Vec::new();
    for n in 0..6 {
        events.push(env.cancel_new_order(&format!("pay-overlap-{n}")).await.1);
    }
    let first_three: Vec<String> = events[..3].iter().map(|e| format!("'{e}'")).collect();
    let mut holder = env
        .lock_rows(&format!(
            "SELECT 1 FROM outbox WHERE event_id IN ({}) FOR UPDATE",
            first_three.join(", ")
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let first_step = tokio::spawn({
        let relay = relay.clone();
        async move { relay.relay_once().await }
    });
    env.wait_for_lock_waiters(1, "the first step's mark waits on the row lock")
        .await;
    // A step that took the first step's rows again would wait on the same
    // row lock to mark them.
    let second = tokio::time::timeout(Duration::from_secs(10), relay.relay_once())
        .await
        .unwrap_or_else(|_| panic!("the second step is stuck behind the first step's rows"));
    assert_eq!(
        second.ok(),
        Some(RelayOutcome::Published {
            published: 3,
            failed: 0
        })
    );
    assert!(
        !first_step.is_finished(),
        "the second step ran while the first was still unmarked"
    );

    release_row_lock(&mut holder)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let first = first_step.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        first.ok(),
        Some(RelayOutcome::Published {
            published: 3,
            failed: 0
        })
    );
    for event in &events {
        assert!(outbox_row(&env, *event).await.published_at.is_some());
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let message = env.take_within("refunds", Duration::from_secs(5)).await;
        let id = message.delivery.properties.message_id().clone();
        assert!(seen.insert(id.map(|m| m.to_string())), "published twice");
    }
    assert_eq!(
        env.queue_depth("refunds").await,
        0,
        "nothing else published"
    );
}

/// The step's publishes go out together without waiting for each other, yet
/// the broker gets them in the order of the outbox ids.
#[tokio::test]
async fn a_relay_step_publishes_its_rows_in_id_order() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    for n in 0..40 {
        env.cancel_new_order(&format!("pay-order-{n}")).await;
    }
    let outcome = env.relay().relay_once().await?;
    assert_eq!(
        outcome,
        RelayOutcome::Published {
            published: 40,
            failed: 0
        }
    );
    let expected: Vec<String> = env
        .outbox_rows("order.canceled")
        .await
        .iter()
        .map(|row| row.event_id.to_string())
        .collect();
    let mut received = Vec::new();
    while let Some(message) = env.take("refunds").await {
        received.push(
            message
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default(),
        );
    }
    assert_eq!(received, expected);
    Ok(())
}

/// A relay's writes (marks, failure notes) may be lost in a database crash
/// at the price of a duplicate publish, so its sessions do not wait for the
/// WAL flush; every other pool's do.
#[tokio::test]
async fn only_the_relays_pool_commits_without_waiting_for_the_wal_flush() -> anyhow::Result<()> {
    #[derive(diesel::QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        synchronous_commit: String,
    }
    async fn setting_of(pool: &store::DbPool) -> anyhow::Result<String> {
        use diesel_async::RunQueryDsl;
        let mut conn = pool.get().await?;
        let row: Setting = diesel::sql_query("SHOW synchronous_commit")
            .get_result(&mut conn)
            .await?;
        Ok(row.synchronous_commit)
    }
    let env = TestEnv::new().await;
    let relays = store::relay_pool(&env.settings.database)?;
    let others = store::pool(&env.settings.database)?;
    assert_eq!(setting_of(&relays).await?, "off");
    assert_eq!(setting_of(&others).await?, "on");
    Ok(())
}
