//! Processes killed at each crash point of DESIGN.md §6, repeatedly.

use std::{collections::HashSet, time::Duration};

use courier::faults::CrashPoint;
use figment::providers::Serialized;

use super::harness::{CONSUMER, GATEWAY, PRODUCER, Run, assert_passed};

const ORDERS: usize = 20;
const SETTLE: Duration = Duration::from_secs(90);
const RELAY_BATCH: usize = ORDERS / 4;

/// A run whose `binary` aborts at `point` on every life's `after`-th hit.
///
/// A consumer that dies hands its whole prefetch window back, in-flight
/// work included, and every return counts toward the queue's
/// `x-delivery-limit`. One delivery at a time per worker makes each life
/// finish `after - 1` deliveries before it dies, so the run progresses and
/// the crash point is hit at an exact step.
///
/// Only the `refunds` worker runs: a crash point counts hits across the
/// whole process, so with the other workers running, their hits could kill
/// each life while the same refund was in flight, until the delivery limit
/// shelved it (a loaded CI run did exactly that). With one worker every
/// delivery is handed back at most once.
///
/// The relay's crash points count steps, not rows: a relay that starts late
/// would take all the orders in one batch and never reach its second step,
/// so the batch is kept well below the number of orders.
async fn run_with_crashes(
    binary: &'static str,
    point: CrashPoint,
    after: &str,
) -> (Run, courier::check::Report) {
    let mut run = Run::new(|f| {
        f.merge(Serialized::default("consumer.prefetch", 1))
            .merge(Serialized::default("consumer.concurrency", 1))
            .merge(Serialized::default("relay.batch_size", RELAY_BATCH))
            .merge(Serialized::default("consumer.workers", ["refunds"]))
    })
    .await;
    run.set_env(
        binary,
        &[
            ("COURIER_CRASH_AT", point.name()),
            ("COURIER_CRASH_AFTER", after),
        ],
    );
    run.start_all().await;
    let orders: HashSet<_> = run
        .cancel_orders(ORDERS, "pay-crash")
        .await
        .into_iter()
        .collect();
    let report = run.settle(&orders, SETTLE).await;
    (run, report)
}

/// Nothing lost or doubled, every order refunded, and `binary` really died.
fn assert_survived(run: &Run, report: &courier::check::Report, binary: &str, what: &str) {
    assert_passed(report, what);
    assert_eq!(report.refunded, ORDERS, "{what}");
    assert!(
        run.starts(binary) >= 2,
        "{what}: {binary} was never killed: {:?}",
        run.pids
    );
}

#[tokio::test]
async fn refund_is_made_once_when_consumer_dies_after_the_gateway_refunded() {
    let (run, report) = run_with_crashes(CONSUMER, CrashPoint::AfterGatewayCall, "3").await;
    assert_survived(
        &run,
        &report,
        CONSUMER,
        "consumer killed after the gateway call",
    );
    let gateway = run.gateway_stats().await;
    assert!(
        gateway.replayed >= 1,
        "no refund was asked for twice, so the fault did not hit: {gateway:?}"
    );
    assert_eq!(
        gateway.refunds_created as usize, ORDERS,
        "the gateway made one refund per order"
    );
}

#[tokio::test]
async fn refund_is_made_once_when_consumer_dies_after_commit_before_ack() {
    let (run, report) = run_with_crashes(CONSUMER, CrashPoint::AfterCommit, "3").await;
    assert_survived(&run, &report, CONSUMER, "consumer killed after commit");
    assert!(
        run.log_count(CONSUMER, "duplicate delivery absorbed") >= 1,
        "no committed delivery came back, so the fault did not hit"
    );
}

#[tokio::test]
async fn refund_is_made_once_when_consumer_dies_before_its_effect() {
    let (run, report) = run_with_crashes(CONSUMER, CrashPoint::BeforeEffect, "3").await;
    assert_survived(&run, &report, CONSUMER, "consumer killed before the effect");
    assert!(
        run.log_count(CONSUMER, "redelivered delivery") >= 1,
        "nothing was redelivered"
    );
}

#[tokio::test]
async fn event_is_refunded_once_when_relay_dies_after_confirm_before_mark() {
    let (run, report) = run_with_crashes(PRODUCER, CrashPoint::AfterConfirmBeforeMark, "2").await;
    assert_survived(&run, &report, PRODUCER, "relay killed after confirm");
    assert!(
        run.log_count(CONSUMER, "duplicate delivery absorbed") >= 1,
        "no confirmed event was published again, so the fault did not hit"
    );
}

#[tokio::test]
async fn event_is_refunded_once_when_relay_dies_after_publish_before_confirm() {
    let (run, report) =
        run_with_crashes(PRODUCER, CrashPoint::AfterPublishBeforeConfirm, "2").await;
    assert_survived(&run, &report, PRODUCER, "relay killed before confirm");
}

#[tokio::test]
async fn refund_is_made_once_when_consumer_is_sigkilled_mid_run() {
    let mut run =
        Run::new(|f| f.merge(Serialized::default("gateway_simulator.latency", "100ms"))).await;
    run.spawn(GATEWAY).await;
    run.spawn(PRODUCER).await;
    let orders: HashSet<_> = run
        .cancel_orders(30, "pay-sigkill")
        .await
        .into_iter()
        .collect();
    run.spawn(CONSUMER).await;
    run.wait_until_refunded(3).await;
    let first = run.pid(CONSUMER);
    let status = run.kill(CONSUMER).await;
    assert!(!status.success(), "SIGKILL ended the consumer: {status}");
    let at_kill = run.env.count("SELECT count(*) FROM refunds").await;
    assert!(
        at_kill < 30,
        "the kill hit mid-run ({at_kill} of 30 refunded)"
    );

    let report = run.settle(&orders, SETTLE).await;
    assert_passed(&report, "consumer SIGKILLed");
    assert_eq!(report.refunded, 30);
    assert_ne!(
        run.pid(CONSUMER),
        first,
        "a new consumer process finished the run"
    );
    let clean = run.stop_all().await;
    assert!(
        clean.values().all(|c| *c),
        "every binary exits 0 on SIGTERM: {clean:?}"
    );
}

/// A run with the gateway and the order service up, whose consumer (not yet
/// started) takes batches of up to 8 and aborts on every life's second batch
/// commit, before any of that batch's acks. Work queued before it starts
/// arrives together, so its batches are full.
async fn run_dying_after_second_batch_commit() -> Run {
    let mut run = Run::new(|f| {
        f.merge(Serialized::default("consumer.prefetch", 8))
            .merge(Serialized::default("consumer.concurrency", 8))
            .merge(Serialized::default("consumer.batch_size", 8))
    })
    .await;
    run.set_env(
        CONSUMER,
        &[
            ("COURIER_CRASH_AT", CrashPoint::AfterBatchCommit.name()),
            ("COURIER_CRASH_AFTER", "2"),
        ],
    );
    run.spawn(GATEWAY).await;
    run.spawn(PRODUCER).await;
    run
}

/// Orders queued before the consumer starts, so its deliveries arrive
/// together and share commits; the consumer aborts on every life's second
/// batch commit, before any of that batch's acks.
#[tokio::test]
async fn refunds_are_made_once_when_consumer_dies_after_a_batch_commit_before_its_acks() {
    let mut run = run_dying_after_second_batch_commit().await;
    let orders: HashSet<_> = run
        .cancel_orders(ORDERS * 2, "pay-batch-crash")
        .await
        .into_iter()
        .collect();
    run.spawn(CONSUMER).await;
    let report = run.settle(&orders, SETTLE).await;
    assert_passed(&report, "consumer killed after a batch commit");
    assert_eq!(report.refunded, ORDERS * 2);
    assert!(
        run.log_count(CONSUMER, "crash point `after-batch-commit` reached") >= 1,
        "no batch of several deliveries ever committed, so the fault did not hit"
    );
    assert!(
        run.log_count(CONSUMER, "duplicate delivery absorbed") >= 2,
        "the committed batch did not come back, so its acks were not what was lost"
    );
}

/// The events are committed before the producer starts, so its relay finds a
/// backlog and every step is a batch of several rows; it aborts on every
/// life's second step once the first of that batch's confirms arrived.
#[tokio::test]
async fn event_is_refunded_once_when_relay_dies_between_a_batch_confirms() {
    let mut run = Run::new(|f| f.merge(Serialized::default("relay.batch_size", RELAY_BATCH))).await;
    run.set_env(
        PRODUCER,
        &[
            ("COURIER_CRASH_AT", CrashPoint::MidConfirms.name()),
            ("COURIER_CRASH_AFTER", "2"),
        ],
    );
    let mut orders = HashSet::new();
    for i in 0..ORDERS {
        let (order_id, _) = run
            .env
            .cancel_new_order(&format!("pay-midconfirm-{i}"))
            .await;
        orders.insert(order_id.as_uuid());
    }
    run.start_all().await;
    let report = run.settle(&orders, SETTLE).await;
    assert_survived(&run, &report, PRODUCER, "relay killed mid-confirms");
    assert!(
        run.log_count(PRODUCER, "crash point `mid-confirms` reached") >= 1,
        "no batch had several confirms outstanding, so the fault did not hit"
    );
    assert!(
        run.log_count(CONSUMER, "duplicate delivery absorbed") >= 1,
        "no confirmed but unmarked event was published again"
    );
}

/// The refund side's relay runs in the consumer: killed there once the
/// broker confirmed a `refund.completed` and before the row was marked, it
/// publishes it again when the consumer is back, and the order service
/// absorbs the copy.
#[tokio::test]
async fn refund_status_is_recorded_once_when_the_refund_relay_dies_after_confirm_before_mark() {
    let (run, report) = run_with_crashes(CONSUMER, CrashPoint::AfterConfirmBeforeMark, "2").await;
    assert_survived(&run, &report, CONSUMER, "refund relay killed after confirm");
    assert_eq!(
        report.refund_statuses.get("refunded"),
        Some(&ORDERS),
        "{report:?}"
    );
    assert!(
        run.log_count(CONSUMER, "crash point `after-confirm-before-mark` reached") >= 1,
        "the refund relay never died between confirm and mark"
    );
    assert!(
        run.log_count(PRODUCER, "duplicate delivery absorbed") >= 1,
        "no confirmed refund event was published again, so the fault did not hit"
    );
}

/// Address changes queued before the consumer starts, so shipping-sync's
/// deliveries arrive together and share commits; the consumer aborts on
/// every life's second batch commit, before any of that batch's acks.
#[tokio::test]
async fn shipping_sync_converges_when_killed_after_a_batch_commit_before_its_acks() {
    let mut run = run_dying_after_second_batch_commit().await;
    let orders: HashSet<_> = run
        .change_addresses(ORDERS / 2, 4, "ship-crash")
        .await
        .into_iter()
        .collect();
    run.spawn(CONSUMER).await;
    let report = run.settle(&orders, SETTLE).await;
    assert_passed(&report, "shipping-sync killed after a batch commit");
    assert_eq!(report.shipping_changed, ORDERS / 2, "{report:?}");
    assert!(
        run.log_count(CONSUMER, "crash point `after-batch-commit` reached") >= 1,
        "no batch of several deliveries ever committed, so the fault did not hit"
    );
    assert!(
        run.starts(CONSUMER) >= 2,
        "the consumer was never killed: {:?}",
        run.pids
    );
    assert!(
        run.log_count(CONSUMER, "duplicate delivery absorbed") >= 2,
        "the committed batch did not come back, so its acks were not what was lost"
    );
}

/// Twenty cancels sent at once: the first is written alone and answered,
/// the other nineteen gather behind it into the next batch, and the order
/// service aborts right after that batch commits, answering none of it. The
/// committed cancels have their events relayed by the next life (nobody
/// signals it; its poll finds them), the clients' retries get 409, and every
/// order is refunded once.
#[tokio::test]
async fn cancels_committed_in_a_batch_before_a_crash_are_refunded_once() {
    let mut run = Run::new(|f| f).await;
    run.set_env(
        PRODUCER,
        &[
            (
                "COURIER_CRASH_AT",
                CrashPoint::AfterCancelBatchCommit.name(),
            ),
            ("COURIER_CRASH_AFTER", "2"),
        ],
    );
    run.start_all().await;
    let orders = run.change_addresses(ORDERS, 0, "pay-cancel-batch").await;
    let http = reqwest::Client::new();
    let listen = run.settings.producer.listen;
    let answers = futures_util::future::join_all(orders.iter().map(|id| {
        http.post(format!("http://{listen}/orders/{id}/cancel"))
            .send()
    }))
    .await;
    run.wait_for_log(
        PRODUCER,
        "crash point `after-cancel-batch-commit` reached",
        "no cancel batch ever committed, so the fault did not hit",
    )
    .await;
    let unanswered: Vec<_> = orders
        .iter()
        .zip(&answers)
        .filter(|(_, answer)| !matches!(answer, Ok(r) if r.status().as_u16() == 200))
        .map(|(id, _)| format!("'{id}'"))
        .collect();
    let committed_unanswered = run
        .env
        .count(&format!(
            "SELECT count(*) FROM orders WHERE state = 'canceled' AND id IN ({})",
            if unanswered.is_empty() {
                "NULL".to_owned()
            } else {
                unanswered.join(",")
            }
        ))
        .await;
    assert!(
        committed_unanswered >= 2,
        "the crash did not land on a committed batch of several cancels: \
         {committed_unanswered} of {} unanswered cancels were committed",
        unanswered.len()
    );
    for id in &orders {
        // 409 "already canceled": the batch committed before the crash.
        run.post_retrying(&format!("/orders/{id}/cancel"), None, &[200, 409])
            .await;
    }
    let scope: HashSet<_> = orders.into_iter().collect();
    let report = run.settle(&scope, SETTLE).await;
    assert_survived(
        &run,
        &report,
        PRODUCER,
        "order service killed after a cancel batch commit",
    );
}
