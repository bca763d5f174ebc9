//! Connections and sessions taken away mid-run, and shutdown under load.

use std::{collections::HashSet, time::Duration};

use figment::providers::Serialized;
use secrecy::ExposeSecret;

use super::harness::{CONSUMER, GATEWAY, PRODUCER, Run, assert_passed};
use crate::helpers::MANAGEMENT;

const SETTLE: Duration = Duration::from_secs(90);

async fn connection_names(run: &Run) -> Vec<String> {
    let amqp = &run.settings.amqp;
    let connections: Vec<serde_json::Value> = reqwest::Client::new()
        .get(format!(
            "{MANAGEMENT}/api/vhosts/{}/connections",
            amqp.vhost
        ))
        .basic_auth(
            &amqp.operator.user,
            Some(amqp.operator.password.expose_secret()),
        )
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    connections
        .iter()
        .filter(|c| {
            let name = c["client_properties"]["connection_name"]
                .as_str()
                .unwrap_or_default();
            name.starts_with("courier-")
        })
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect()
}

/// The relay's connection, and one per consumer worker (refunds, notifications).
const EXPECTED_CONNECTIONS: usize = 3;

#[tokio::test]
async fn force_closed_connections_of_relay_and_consumer_heal_by_themselves() {
    let mut run = Run::new(|f| f).await;
    run.start_all().await;
    let mut orders: HashSet<_> = run
        .cancel_orders(10, "pay-closed-a")
        .await
        .into_iter()
        .collect();
    // The management API lists connections with a delay; wait for all of
    // them, so that every one is closed below and none is left untouched.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let before = loop {
        let names = connection_names(&run).await;
        if names.len() >= EXPECTED_CONNECTIONS {
            break names;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections never listed: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let amqp = &run.settings.amqp;
    for name in &before {
        reqwest::Client::new()
            .delete(format!("{MANAGEMENT}/api/connections/{}", urlencode(name)))
            .basic_auth(
                &amqp.operator.user,
                Some(amqp.operator.password.expose_secret()),
            )
            .header("X-Reason", "failure-injection test")
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .unwrap_or_else(|e| panic!("closing {name}: {e}"));
    }
    orders.extend(run.cancel_orders(10, "pay-closed-b").await);
    let report = run.settle(&orders, SETTLE).await;
    assert_passed(&report, "connections force-closed");
    assert_eq!(report.refunded, 20);
    // The management API lists connections a little late; wait for the new ones.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let after = loop {
        let names = connection_names(&run).await;
        if names.len() >= EXPECTED_CONNECTIONS || tokio::time::Instant::now() >= deadline {
            break names;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        after.iter().all(|name| !before.contains(name)) && !after.is_empty(),
        "new connections replaced the closed ones: before {before:?}, after {after:?}"
    );
    assert_eq!(
        run.starts(CONSUMER),
        1,
        "the consumer process healed without a restart"
    );
}

fn urlencode(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn terminated_database_sessions_pause_and_resume_without_dead_letters() {
    let mut run = Run::new(|f| f).await;
    run.start_all().await;
    let mut orders: HashSet<_> = run
        .cancel_orders(10, "pay-pgkill-a")
        .await
        .into_iter()
        .collect();
    let killed = run
        .env
        .count(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .await;
    assert!(
        killed >= 2,
        "the relay's and the consumer's sessions were terminated: {killed}"
    );
    orders.extend(run.cancel_orders(10, "pay-pgkill-b").await);
    let report = run.settle(&orders, SETTLE).await;
    assert_passed(&report, "database sessions terminated");
    assert_eq!(report.refunded, 20);
    assert_eq!(
        report.dead_total(),
        0,
        "nothing was dead-lettered because of the database"
    );
}

#[tokio::test]
async fn sigterm_under_load_exits_0_and_redelivers_nothing_committed() {
    let mut run =
        Run::new(|f| f.merge(Serialized::default("gateway_simulator.latency", "300ms"))).await;
    run.spawn(GATEWAY).await;
    run.spawn(PRODUCER).await;
    let orders: HashSet<_> = run
        .cancel_orders(60, "pay-sigterm")
        .await
        .into_iter()
        .collect();
    // A backlog first, then the consumer, stopped while it is busy with it.
    run.spawn(CONSUMER).await;
    run.wait_until_refunded(5).await;
    let status = run.terminate(CONSUMER, Duration::from_secs(30)).await;
    assert!(status.success(), "SIGTERM must exit 0: {status}");
    let refunded_at_stop = run.env.count("SELECT count(*) FROM refunds").await;
    let notified_at_stop = run
        .env
        .count("SELECT count(*) FROM processed_messages WHERE consumer = 'notifications'")
        .await;
    assert!(
        refunded_at_stop < 60,
        "the consumer stopped mid-run (refunded {refunded_at_stop} of 60)"
    );

    run.spawn(CONSUMER).await;
    let report = run.settle(&orders, SETTLE).await;
    assert_passed(&report, "SIGTERM under load");
    // Redelivered committed work would be at the head of the queues, so once
    // the new consumer has counted every effect it made itself, any such
    // redelivery has been counted too.
    let refunds_left = u64::try_from(60 - refunded_at_stop).unwrap_or_default();
    let notifications_left = u64::try_from(60 - notified_at_stop).unwrap_or_default();
    let deadline = tokio::time::Instant::now() + SETTLE;
    let stats = loop {
        let stats = run.consumer_stats().await;
        if stats["refunds"].handled == refunds_left
            && stats["notifications"].handled == notifications_left
        {
            break stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted consumer never counted its own work: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        stats["refunds"].duplicates + stats["notifications"].duplicates,
        0,
        "work committed before SIGTERM was delivered again: {stats:?}"
    );
}
