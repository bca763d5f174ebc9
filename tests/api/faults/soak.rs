//! The soak: a long run with many faults of every kind on a schedule, and the
//! checker's table at the end: cancellations (their refunds and the refund
//! statuses back on the orders), forged events, and address changes (the
//! shipping read model). Outside CI (`scripts/soak.sh`); its latest
//! table is in RELIABILITY.md.

use std::{collections::HashSet, time::Duration};

use courier::{
    amqp::ConfirmedPublisher,
    domain::{AmountCents, OrderId},
    store,
};
use figment::providers::Serialized;
use lapin::{Connection, ConnectionProperties};
use uuid::Uuid;

use super::harness::{CONSUMER, PRODUCER, Run, assert_passed};
use crate::{
    helpers::{event_for, publish_event_into},
    support::BrokerNode,
};

/// Messages the order service did not send, published straight into
/// `refunds` beside the real ones: none may move money.
#[derive(Debug, Default)]
struct Forgeries {
    /// A canceled order's cancellation again, under a new message id.
    repeated: usize,
    /// For an order that does not exist, one that is not canceled, and a
    /// canceled one with an inflated amount.
    forged: usize,
}

impl Forgeries {
    /// One of each kind, for `canceled` (an order of this step). The broker
    /// may be restarting: retried on a fresh connection until it takes them.
    async fn publish(&mut self, run: &Run, canceled: Uuid, step: usize) {
        let env = &run.env;
        let mut conn = env.conn().await;
        let real = store::orders::find(&mut conn, OrderId::from_uuid(canceled))
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("order {canceled} not found"));
        drop(conn);
        let placed = env.place_order(&format!("pay-forged-placed-{step}")).await;
        let mut ghost = event_for(&placed);
        ghost.order_id = OrderId::generate();
        let mut inflated = event_for(&real);
        inflated.amount_cents =
            AmountCents::parse(real.amount.cents() * 1000).unwrap_or(real.amount);
        let events = [event_for(&real), ghost, event_for(&placed), inflated];
        let uri = run.settings.amqp.uri_as(&run.settings.amqp.operator);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let published = async {
                let connection = Connection::connect(&uri, ConnectionProperties::default()).await?;
                let publisher = ConfirmedPublisher::open(&connection).await?;
                for event in &events {
                    publish_event_into(&publisher, "refunds", event).await?;
                }
                let _ = connection.close(200, "forged".into()).await;
                anyhow::Ok(())
            };
            match published.await {
                Ok(()) => break,
                Err(error) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "could not publish the forgeries: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        self.repeated += 1;
        self.forged += events.len() - 1;
    }
}

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How many times each soak order that stays placed changes its address.
const ADDRESS_CHANGES: usize = 3;

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillConsumer,
    KillRelay,
    RestartBroker,
}

/// The faults, interleaved evenly: e.g. 100 consumer kills, 20 relay kills
/// and 5 broker restarts become one sequence of 125 spread over the run.
fn schedule(consumer_kills: usize, relay_kills: usize, broker_restarts: usize) -> Vec<Fault> {
    let mut tagged: Vec<(f64, Fault)> = Vec::new();
    for (count, fault) in [
        (consumer_kills, Fault::KillConsumer),
        (relay_kills, Fault::KillRelay),
        (broker_restarts, Fault::RestartBroker),
    ] {
        for i in 0..count {
            tagged.push(((i as f64 + 0.5) / count as f64, fault));
        }
    }
    tagged.sort_by(|a, b| a.0.total_cmp(&b.0));
    tagged.into_iter().map(|(_, fault)| fault).collect()
}

#[tokio::test]
#[ignore = "long-running soak; run scripts/soak.sh"]
async fn soak() {
    let orders = knob("COURIER_SOAK_ORDERS", 10_000);
    let faults = schedule(
        knob("COURIER_SOAK_CONSUMER_KILLS", 100),
        knob("COURIER_SOAK_RELAY_KILLS", 20),
        knob("COURIER_SOAK_BROKER_RESTARTS", 5),
    );
    let started = std::time::Instant::now();
    let mut broker = BrokerNode::start().await;
    let port = broker.amqp_port();
    let mut run = Run::new(|f| {
        f.merge(Serialized::default("amqp.port", port))
            .merge(Serialized::default("amqp.vhost", "/"))
            .merge(Serialized::default(
                "amqp.management_url",
                broker.management_url(),
            ))
            .merge(Serialized::default(
                "gateway_simulator.transient_error_rate",
                0.05,
            ))
            .merge(Serialized::default("topology.delivery_limit", 50))
            .merge(Serialized::default("database.pool_size", 8))
    })
    .await;
    run.start_all().await;

    // Cancels sent at once, so the order service commits them in batches and
    // the kills land in the middle of batches on every side.
    let clients = knob("COURIER_SOAK_CLIENTS", 8);
    let per_step = orders / (faults.len() + 1);
    let address_orders = knob(
        "COURIER_SOAK_ADDRESS_ORDERS_PER_STEP",
        (per_step / 10).max(1),
    );
    let mut scope = HashSet::new();
    let mut broker_restarts = 0;
    let mut leaderless_healed = Vec::new();
    let mut forgeries = Forgeries::default();
    let mut addressed = 0;
    for (step, fault) in faults.iter().enumerate() {
        let canceled = run
            .cancel_orders_concurrently(per_step, &format!("pay-soak-{step}"), clients)
            .await;
        if let Some(first) = canceled.first() {
            forgeries.publish(&run, *first, step).await;
        }
        scope.extend(canceled);
        // Orders that stay placed, their address changed a few times each:
        // the shipping read model must end on every order's last address.
        let moved = run
            .change_addresses(address_orders, ADDRESS_CHANGES, &format!("soak-{step}"))
            .await;
        addressed += moved.len();
        scope.extend(moved);
        match fault {
            Fault::KillConsumer => {
                run.kill(CONSUMER).await;
            }
            Fault::KillRelay => {
                run.kill(PRODUCER).await;
            }
            Fault::RestartBroker => {
                broker.kill().await;
                broker.restart().await;
                broker_restarts += 1;
                tokio::time::sleep(Duration::from_secs(5)).await;
                leaderless_healed.extend(
                    broker
                        .elect_leaderless_quorum_queues(&run.quorum_queue_names())
                        .await,
                );
            }
        }
        run.keep_alive().await;
    }
    let rest = orders - per_step * faults.len();
    scope.extend(
        run.cancel_orders_concurrently(rest, "pay-soak-last", clients)
            .await,
    );
    let report = run.settle(&scope, Duration::from_secs(900)).await;
    let elapsed = started.elapsed();

    println!();
    println!("| soak | value |");
    println!("|---|---|");
    println!("| orders canceled | {} |", report.canceled);
    println!("| refunded | {} |", report.refunded);
    println!(
        "| refunds in the gateway's ledger | {} |",
        report.refunds_in_gateway
    );
    println!("| dead-lettered (by kind) | {:?} |", report.dead_lettered);
    println!("| **lost** | **{}** |", report.lost.len());
    println!("| **doubled** | **{}** |", report.doubled.len());
    println!("| **stuck in the outbox** | **{}** |", report.stuck);
    println!(
        "| forged events published (no such order / not canceled / inflated amount) | {} |",
        forgeries.forged
    );
    println!(
        "| canceled orders' events published again under new ids | {} |",
        forgeries.repeated
    );
    println!(
        "| **refunds in the gateway's ledger for no canceled order** | **{}** |",
        report.without_cancel.len()
    );
    println!(
        "| refunded but shelved | {} |",
        report.refunded_but_shelved.len()
    );
    println!(
        "| canceled orders by refund status (on the order) | {:?} |",
        report.refund_statuses
    );
    println!(
        "| **canceled orders without a refund status / disagreeing with the refund** | **{} / {}** |",
        report.without_status.len(),
        report.status_mismatch.len()
    );
    println!(
        "| orders whose address changed ({ADDRESS_CHANGES} times each) | {addressed} (in the outbox: {}) |",
        report.shipping_changed
    );
    println!(
        "| **shipping read model not at the last address** | **{}** |",
        report.unconverged.len()
    );
    println!(
        "| stale shipping changes skipped (consumer's last life) | {} |",
        run.consumer_stats()
            .await
            .get("shipping-sync")
            .map_or(0, |s| s.skipped)
    );
    println!(
        "| consumer processes (kills + 1) | {} |",
        run.starts(CONSUMER)
    );
    println!(
        "| producer/relay processes (kills + 1) | {} |",
        run.starts(PRODUCER)
    );
    println!("| broker SIGKILL + restarts | {broker_restarts} |");
    println!(
        "| queues left leaderless by a kill, re-elected (rabbitmq-server#10070) | {} |",
        leaderless_healed.len()
    );
    println!(
        "| duplicate deliveries absorbed (consumer logs) | {} |",
        run.log_count(CONSUMER, "duplicate delivery absorbed")
    );
    println!(
        "| duplicate refund reports absorbed (order service logs) | {} |",
        run.log_count(PRODUCER, "duplicate delivery absorbed")
    );
    let per_commit = |rows: i64, commits: i64| rows as f64 / commits.max(1) as f64;
    println!(
        "| cancels per commit, from {clients} concurrent clients (mean; one transaction id per commit) | {:.1} |",
        per_commit(
            run.env
                .count("SELECT count(*) FROM outbox WHERE event_type = 'order.canceled'")
                .await,
            run.env
                .count(
                    "SELECT count(DISTINCT tx_id) FROM outbox WHERE event_type = 'order.canceled'"
                )
                .await
        )
    );
    println!(
        "| refunds per commit (mean; one inbox time per commit) | {:.1} |",
        per_commit(
            run.env
                .count("SELECT count(*) FROM processed_messages WHERE consumer = 'refunds'")
                .await,
            run.env
                .count("SELECT count(DISTINCT processed_at) FROM processed_messages WHERE consumer = 'refunds'")
                .await
        )
    );
    println!("| wall time | {:.0} s |", elapsed.as_secs_f64());
    assert_passed(&report, "soak");
}
