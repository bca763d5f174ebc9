//! The soak: a long run with many faults of every kind on a schedule, and the
//! checker's table at the end. Outside CI (`scripts/soak.sh`); its latest
//! table is in RELIABILITY.md.

use std::{collections::HashSet, time::Duration};

use figment::providers::Serialized;

use super::harness::{CONSUMER, PRODUCER, Run, assert_passed};
use crate::support::BrokerNode;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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
                "gateway_simulator.transient_error_rate",
                0.05,
            ))
            .merge(Serialized::default("topology.delivery_limit", 50))
            .merge(Serialized::default("database.pool_size", 8))
    })
    .await;
    run.start_all().await;

    let per_step = orders / (faults.len() + 1);
    let mut scope = HashSet::new();
    let mut broker_restarts = 0;
    let mut leaderless_healed = Vec::new();
    for (step, fault) in faults.iter().enumerate() {
        scope.extend(
            run.cancel_orders(per_step, &format!("pay-soak-{step}"))
                .await,
        );
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
    scope.extend(run.cancel_orders(rest, "pay-soak-last").await);
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
        "| refunded but shelved | {} |",
        report.refunded_but_shelved.len()
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
    println!("| wall time | {:.0} s |", elapsed.as_secs_f64());
    assert_passed(&report, "soak");
}
