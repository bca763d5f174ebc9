//! Outages of the servers themselves: a throwaway RabbitMQ node stopped,
//! started, SIGKILLed and restarted; a throwaway PostgreSQL cluster restarted;
//! the broker connection blackholed through a TCP proxy. Never the machine's
//! shared services.

use std::{collections::HashSet, time::Duration};

use figment::providers::Serialized;

use super::harness::{CONSUMER, PRODUCER, Run, assert_passed};
use crate::support::{BrokerNode, PgCluster, TcpProxy};

const SETTLE: Duration = Duration::from_secs(120);

async fn run_on_broker(broker: &BrokerNode) -> Run {
    let port = broker.amqp_port();
    Run::new(|f| {
        f.merge(Serialized::default("amqp.port", port))
            .merge(Serialized::default("amqp.vhost", "/"))
            .merge(Serialized::default(
                "amqp.management_url",
                broker.management_url(),
            ))
    })
    .await
}

async fn pending_outbox(run: &Run) -> i64 {
    run.env
        .count("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .await
}

/// Cancels `n` orders while the broker is away and proves they waited in the outbox.
async fn cancel_during_outage(run: &mut Run, n: usize, prefix: &str) -> Vec<uuid::Uuid> {
    let orders = run.cancel_orders(n, prefix).await;
    assert!(
        pending_outbox(run).await > 0,
        "with the broker away the events wait in the outbox"
    );
    orders
}

#[tokio::test]
async fn broker_stopped_and_started_mid_run_loses_nothing() {
    let mut broker = BrokerNode::start().await;
    let mut run = run_on_broker(&broker).await;
    run.start_all().await;
    let mut orders: HashSet<_> = run
        .cancel_orders(10, "pay-stop-a")
        .await
        .into_iter()
        .collect();
    let before = broker.list_connections().await;
    assert!(!before.is_empty(), "our binaries are connected");

    broker.stop_app().await;
    orders.extend(cancel_during_outage(&mut run, 10, "pay-stop-b").await);
    broker.start_app().await;

    let report = run.settle(&orders, SETTLE).await;
    assert_passed(&report, "broker stopped and started");
    assert_eq!(report.refunded, 20);
    let after = broker.list_connections().await;
    assert!(
        after.iter().all(|c| !before.iter().any(|b| b.pid == c.pid)),
        "every connection is new: before {before:?}, after {after:?}"
    );
    assert_eq!(
        run.starts(CONSUMER),
        1,
        "the binaries healed without restarts"
    );
    assert_eq!(run.starts(PRODUCER), 1);
}

#[tokio::test]
async fn broker_sigkilled_and_restarted_mid_run_loses_nothing() {
    let mut broker = BrokerNode::start().await;
    let mut run = run_on_broker(&broker).await;
    run.start_all().await;
    let mut orders: HashSet<_> = run
        .cancel_orders(10, "pay-kill-a")
        .await
        .into_iter()
        .collect();
    let beam = broker.beam_pid();

    broker.kill().await;
    assert!(!broker.is_running(), "the broker is dead");
    orders.extend(cancel_during_outage(&mut run, 10, "pay-kill-b").await);
    broker.restart().await;
    assert_ne!(broker.beam_pid(), beam, "a new broker process");
    // Give the broker's own recovery a fair chance, then apply the broker
    // operator's remedy for rabbitmq-server#10070 to any queue still
    // leaderless. courier needs no step of its own: until then the events
    // simply wait in the outbox.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pending_outbox(&run).await > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let healed = broker
        .elect_leaderless_quorum_queues(&run.quorum_queue_names())
        .await;
    println!("quorum queues left leaderless by the kill (rabbitmq-server#10070): {healed:?}");

    let report = run.settle(&orders, SETTLE).await;
    assert_passed(&report, "broker SIGKILLed and restarted");
    assert_eq!(report.refunded, 20);
    assert_eq!(
        run.starts(CONSUMER),
        1,
        "the binaries healed without restarts"
    );
    assert_eq!(run.starts(PRODUCER), 1);
}

#[tokio::test]
async fn database_restarted_mid_run_pauses_and_resumes_without_dead_letters() {
    let mut pg = PgCluster::start().await;
    let port = pg.port();
    let mut run = Run::new(|f| f.merge(Serialized::default("database.port", port))).await;
    run.start_all().await;
    let mut orders: HashSet<_> = run
        .cancel_orders(10, "pay-pg-a")
        .await
        .into_iter()
        .collect();
    let postmaster = pg.postmaster_pid();

    pg.stop().await;
    // The database stays down until the producer has noticed: its relay's
    // next poll finds its pooled session ended by the shutdown.
    run.wait_for_log(
        PRODUCER,
        "relay paused",
        "the producer never noticed the database going away",
    )
    .await;
    pg.start_again().await;
    assert_ne!(pg.postmaster_pid(), postmaster, "a new PostgreSQL process");
    orders.extend(run.cancel_orders(10, "pay-pg-b").await);

    let report = run.settle(&orders, SETTLE).await;
    assert_passed(&report, "database restarted");
    assert_eq!(report.refunded, 20);
    assert_eq!(
        report.dead_total(),
        0,
        "nothing was dead-lettered because the database was down"
    );
    assert_eq!(
        run.starts(CONSUMER),
        1,
        "the binaries healed without restarts"
    );
    assert_eq!(run.starts(PRODUCER), 1);
}

#[tokio::test]
async fn blackholed_broker_connection_is_noticed_and_reconnected() {
    let broker: std::net::SocketAddr = ([127, 0, 0, 1], 5672).into();
    let proxy = TcpProxy::start(broker).await;
    let mut run = Run::new(|f| f).await;
    // Only the binaries go through the proxy; the test's own checks do not.
    run.settings.amqp.port = proxy.port();
    run.start_all().await;
    let mut orders: HashSet<_> = run
        .cancel_orders(10, "pay-hole-a")
        .await
        .into_iter()
        .collect();
    let consuming = |run: &Run| {
        (
            run.log_count(CONSUMER, "consuming"),
            run.log_count(PRODUCER, "consuming"),
        )
    };
    let before = consuming(&run);

    proxy.blackhole();
    orders.extend(run.cancel_orders(10, "pay-hole-b").await);
    // Longer than twice the 2 s heartbeat: both binaries must notice the
    // silence (each runs workers: the order service its refund-status one).
    for (binary, what) in [(CONSUMER, "the consumer"), (PRODUCER, "the order service")] {
        run.wait_for_log(
            binary,
            "consumer session ended",
            &format!("{what} never noticed the dead connection"),
        )
        .await;
    }
    proxy.pass();

    let report = run.settle(&orders, SETTLE).await;
    assert_passed(&report, "broker connection blackholed");
    assert_eq!(report.refunded, 20);
    // A connection the pool still held may have outlived the blackhole, so
    // the proof of healing is that every worker consumed again.
    let after = consuming(&run);
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "both binaries consumed again after the blackhole: {before:?} -> {after:?}"
    );
}

#[tokio::test]
async fn database_connections_cut_through_a_proxy_pause_and_resume_without_dead_letters() {
    let postgres: std::net::SocketAddr = ([127, 0, 0, 1], 5432).into();
    let proxy = TcpProxy::start(postgres).await;
    let mut run = Run::new(|f| f).await;
    // Only the binaries reach the database through the proxy.
    run.settings.database.port = proxy.port();
    run.start_all().await;
    let mut orders: HashSet<_> = run
        .cancel_orders(10, "pay-dbcut-a")
        .await
        .into_iter()
        .collect();

    let killed = proxy.cut().await;
    assert!(
        killed >= 2,
        "the binaries' database connections were cut: {killed}"
    );
    // Deliveries that arrive now cannot be checked against the inbox: the
    // consumer must hand them back and wait, not retry or dead-letter them.
    run.republish_all_events().await;
    run.wait_for_log(
        CONSUMER,
        "consumption paused",
        "the consumer never paused for the database",
    )
    .await;
    proxy.pass();
    orders.extend(run.cancel_orders(10, "pay-dbcut-b").await);

    let report = run.settle(&orders, SETTLE).await;
    assert_passed(&report, "database connections cut");
    assert_eq!(report.refunded, 20);
    assert_eq!(
        report.dead_total(),
        0,
        "nothing was dead-lettered because the database was away"
    );
    assert_eq!(
        run.starts(CONSUMER),
        1,
        "the binaries healed without restarts"
    );
    assert_eq!(run.starts(PRODUCER), 1);
}
