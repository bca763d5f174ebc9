//! The README's first command, scaled down: real binaries, a flaky gateway,
//! and a summary with nothing lost, doubled or pending.

use std::{path::Path, time::Duration};

use courier::demo::{self, DemoOptions};
use figment::providers::Serialized;

use crate::helpers::{MANAGEMENT, TestEnv, free_port};

#[tokio::test]
async fn the_demo_summary_shows_zero_pending_lost_and_doubled() {
    let (producer, consumer, gateway) = (free_port().await, free_port().await, free_port().await);
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default("producer.listen", &producer))
            .merge(Serialized::default("consumer.stats_listen", &consumer))
            .merge(Serialized::default("gateway_simulator.listen", &gateway))
            .merge(Serialized::default(
                "gateway_simulator.transient_error_rate",
                0.2,
            ))
            .merge(Serialized::default(
                "gateway_simulator.failing_payment_ids",
                ["pay-dead-demo"],
            ))
    })
    .await;
    let mut settings = env.settings.clone();
    settings.gateway.url = format!("http://{gateway}");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_producer"))
        .parent()
        .unwrap_or_else(|| panic!("binaries have a directory"))
        .to_owned();
    let options = DemoOptions {
        orders: 60,
        concurrency: 8,
        bin_dir,
        log_dir: std::env::temp_dir().join(format!("{}-logs", env.name)),
        settle_timeout: Duration::from_secs(90),
        show_progress: false,
        management_url: MANAGEMENT.to_owned(),
    };
    let summary = demo::run(&settings, &options)
        .await
        .unwrap_or_else(|e| panic!("demo failed: {e:#}"));
    println!("{summary}");

    assert_eq!(summary.pending_outbox, 0);
    assert_eq!(summary.lost, 0);
    assert_eq!(summary.doubled, 0);
    assert!(summary.passed());
    let refunds = &summary.workers["refunds"];
    assert_eq!(
        summary.refunded as u64 + refunds.dead_total(),
        60,
        "every cancellation is settled"
    );
    assert_eq!(
        refunds.dead_lettered["permanent"], 1,
        "the always-failing payment is shelved"
    );
    assert!(
        refunds.retried.iter().map(|(_, n)| n).sum::<u64>() > 0,
        "the flaky gateway caused retries"
    );
    assert_eq!(
        summary
            .dead_letter_samples
            .iter()
            .map(|s| s.count as u64)
            .sum::<u64>(),
        refunds.dead_total(),
        "every dead letter of the run is explained: {:?}",
        summary.dead_letter_samples
    );
    assert_eq!(summary.refunds_in_gateway as i64, summary.refunded);
    assert_eq!(
        summary.refund_statuses.get("refunded").copied(),
        Some(summary.refunded as usize),
        "every refund shows on its order: {:?}",
        summary.refund_statuses
    );
    assert_eq!(
        summary
            .refund_statuses
            .get("refund_failed")
            .map(|n| *n as u64),
        Some(refunds.dead_total()),
        "so does every refund given up on: the one the gateway refused, and any \
         whose every try met the flaky gateway's 503: {:?}",
        summary.refund_statuses
    );
    assert_eq!(summary.without_status, 0);
    assert!(
        summary.clean_exits.iter().all(|(_, clean)| *clean),
        "{:?}",
        summary.clean_exits
    );
}
