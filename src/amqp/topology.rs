//! The broker objects of DESIGN.md §3: which exchanges, queues and bindings a
//! topology has ([`Topology::plan`], with each queue's policy), declared by
//! the operator (`courier topology apply`), and the passive checks the
//! services make. Names come from config, so each test can run in its own
//! vhost; which workers exist, what they are bound to and who runs them comes
//! from the registry.
//!
//! Two event exchanges, one per publisher, each with its alternate exchange:
//! the order service's (`orders.events`) and the refund context's
//! (`refunds.events`), so that each service's broker user can publish only
//! its own context's events.

use std::time::Duration;

use std::collections::HashSet;

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde_json::Value;

use super::plan::{self, Arguments, TopologyPlan};
use crate::{
    config::TopologySettings,
    domain::Publisher,
    registry::{self, Process},
};

/// The parking lot of a worker's queue: `refunds` -> `refunds.dead`.
pub fn dead_letter_queue(worker: &str) -> String {
    format!("{worker}.dead")
}

/// A worker's queues: the work queue, one delay queue per tier, the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerQueues {
    pub name: String,
    /// The exchange its work queue is bound to.
    pub source_exchange: String,
    pub routing_keys: Vec<&'static str>,
    pub retry_delays: Vec<Duration>,
    /// Whose broker user reads it and writes its failure copies.
    pub runs_in: Process,
}

impl WorkerQueues {
    pub fn work(&self) -> &str {
        &self.name
    }

    pub fn dead(&self) -> String {
        dead_letter_queue(&self.name)
    }

    /// The direct exchange the consumer publishes its retry and dead-letter
    /// copies through, routed by the target queue's name. Its own exchange,
    /// not the default one: write permission on the default exchange would
    /// reach every queue, the work queues included.
    pub fn failures_exchange(&self) -> String {
        format!("{}.failures", self.name)
    }

    /// `refunds.retry.10s`: the tier's delay is in the name, visible in the management UI.
    pub fn retry(&self, tier: usize) -> Option<String> {
        self.retry_delays
            .get(tier)
            .map(|delay| format!("{}.retry.{}", self.name, humantime::format_duration(*delay)))
    }

    pub fn retry_queues(&self) -> Vec<String> {
        (0..self.retry_delays.len())
            .filter_map(|tier| self.retry(tier))
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Topology {
    /// The order service's events exchange and its alternate exchange.
    pub events_exchange: String,
    pub unrouted_exchange: String,
    /// The refund context's events exchange and its alternate exchange.
    pub refund_events_exchange: String,
    pub refund_unrouted_exchange: String,
    pub delivery_limit: u32,
    pub work_queue_max_length: Option<u32>,
    pub workers: Vec<WorkerQueues>,
}

impl Topology {
    /// The whole topology: every registered worker's queues are declared,
    /// whichever workers this process runs, so no event is unroutable
    /// because a consumer has not started yet.
    pub fn from_settings(settings: &TopologySettings) -> Self {
        let mut topology = Self {
            events_exchange: settings.events_exchange.clone(),
            unrouted_exchange: settings.unrouted_exchange.clone(),
            refund_events_exchange: settings.refund_events_exchange.clone(),
            refund_unrouted_exchange: settings.refund_unrouted_exchange.clone(),
            delivery_limit: settings.delivery_limit,
            work_queue_max_length: settings.work_queue_max_length,
            workers: Vec::new(),
        };
        topology.workers = registry::WORKERS
            .iter()
            .map(|entry| WorkerQueues {
                name: entry.name.to_owned(),
                source_exchange: topology.exchange_of(entry.source).to_owned(),
                routing_keys: entry.routing_keys.to_vec(),
                retry_delays: settings.retry_delays.clone(),
                runs_in: entry.runs_in,
            })
            .collect();
        topology
    }

    pub fn worker(&self, name: &str) -> Option<&WorkerQueues> {
        self.workers.iter().find(|w| w.name == name)
    }

    /// The workers `process` runs (whose queues its broker user reads).
    pub fn workers_in(&self, process: Process) -> impl Iterator<Item = &WorkerQueues> {
        self.workers.iter().filter(move |w| w.runs_in == process)
    }

    /// The exchange `publisher`'s relay publishes to.
    pub fn exchange_of(&self, publisher: Publisher) -> &str {
        match publisher {
            Publisher::Orders => &self.events_exchange,
            Publisher::Refunds => &self.refund_events_exchange,
        }
    }

    fn unrouted_of(&self, publisher: Publisher) -> &str {
        match publisher {
            Publisher::Orders => &self.unrouted_exchange,
            Publisher::Refunds => &self.refund_unrouted_exchange,
        }
    }

    /// The exchanges `process`'s relays publish to.
    pub fn relay_exchanges_of(&self, process: Process) -> impl Iterator<Item = &str> {
        Publisher::ALL
            .into_iter()
            .filter(move |p| registry::relayed_by(*p) == process)
            .map(|p| self.exchange_of(p))
    }

    /// Checks, without changing anything, that the exchange a relay
    /// publishes to exists. Passive declares need no permission, so a service
    /// user that may configure nothing can still tell a missing topology
    /// (404 NOT_FOUND) from a refused one (403 ACCESS_REFUSED).
    pub async fn verify_for_relay(
        &self,
        channel: &Channel,
        publisher: Publisher,
    ) -> Result<(), lapin::Error> {
        passive_exchange(channel, self.exchange_of(publisher)).await
    }

    /// Checks that a worker's work queue and failures exchange exist.
    pub async fn verify_for_worker(
        &self,
        channel: &Channel,
        worker: &WorkerQueues,
    ) -> Result<(), lapin::Error> {
        passive_exchange(channel, &worker.failures_exchange()).await?;
        passive_queue(channel, worker.work()).await?;
        Ok(())
    }

    /// Every exchange, queue, binding and policy this topology needs, as
    /// data: what `declare` and the policies apply and what `courier
    /// topology check` compares the live broker with.
    pub fn plan(&self) -> TopologyPlan {
        let mut plan = TopologyPlan::default();
        for publisher in Publisher::ALL {
            let (events, unrouted) = (self.exchange_of(publisher), self.unrouted_of(publisher));
            plan.exchange(unrouted, "fanout", Arguments::new());
            plan.queue(
                unrouted,
                &format!(
                    "{} events no queue was bound for (the alternate exchange's queue)",
                    publisher.as_str()
                ),
                plan::parking(),
            );
            plan.bind(unrouted, unrouted, "");
            plan.exchange(
                events,
                "topic",
                Arguments::from([("alternate-exchange".to_owned(), Value::from(unrouted))]),
            );
        }
        for worker in &self.workers {
            let failures = worker.failures_exchange();
            plan.exchange(&failures, "direct", Arguments::new());
            let dead = worker.dead();
            plan.queue(
                &dead,
                &format!("dead letters of {}, with why (courier dlq)", worker.name),
                plan::parking(),
            );
            plan.bind(&failures, &dead, &dead);
            for (tier, delay) in worker.retry_delays.iter().enumerate() {
                let Some(name) = worker.retry(tier) else {
                    continue;
                };
                let mut policy = plan::dead_lettering(worker.work());
                policy.insert(
                    "message-ttl".to_owned(),
                    Value::from(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)),
                );
                plan.queue(
                    &name,
                    &format!(
                        "delay tier {} of {}: back to {} after {}",
                        tier + 1,
                        worker.name,
                        worker.work(),
                        humantime::format_duration(*delay)
                    ),
                    policy,
                );
                plan.bind(&failures, &name, &name);
            }
            let mut policy = plan::dead_lettering(&dead);
            policy.insert(
                "delivery-limit".to_owned(),
                Value::from(self.delivery_limit),
            );
            if let Some(max) = self.work_queue_max_length {
                policy.insert("max-length".to_owned(), Value::from(max));
            }
            plan.queue(
                worker.work(),
                &format!("work queue of the {} worker", worker.name),
                policy,
            );
            for key in &worker.routing_keys {
                plan.bind(&worker.source_exchange, worker.work(), key);
            }
        }
        plan
    }

    /// Declares exchanges, queues and bindings over AMQP: the operator's job
    /// (`courier topology apply`, run by scripts/setup.sh), not the services',
    /// which may configure nothing. The queues' changeable settings are their
    /// policies, which [`crate::amqp::provision::declare_topology`] applies
    /// too. Safe to call again; fails with PRECONDITION_FAILED if a queue
    /// exists with other arguments (the migration there handles that).
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        self.plan().declare(channel, &HashSet::new()).await
    }
}

/// A queue's ready messages and consumers, without changing anything (a
/// passive declare: exact, unlike the management API's lagging statistics;
/// 404 NOT_FOUND if it does not exist).
pub async fn passive_queue(channel: &Channel, name: &str) -> Result<lapin::Queue, lapin::Error> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

async fn passive_exchange(channel: &Channel, name: &str) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// A topology for unit tests: `workers` with one-second tiers for `tiers`.
#[cfg(test)]
pub(crate) fn example(workers: &[&str], tiers: usize) -> Topology {
    Topology {
        events_exchange: "orders.events".into(),
        unrouted_exchange: "orders.unrouted".into(),
        refund_events_exchange: "refunds.events".into(),
        refund_unrouted_exchange: "refunds.unrouted".into(),
        delivery_limit: 10,
        work_queue_max_length: None,
        workers: workers
            .iter()
            .map(|name| WorkerQueues {
                name: (*name).to_owned(),
                source_exchange: "orders.events".into(),
                routing_keys: vec!["order.canceled"],
                retry_delays: (1..=tiers).map(|i| Duration::from_secs(i as u64)).collect(),
                runs_in: Process::Consumer,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_queues_are_named_after_their_delay() {
        let worker = WorkerQueues {
            name: "refunds".into(),
            source_exchange: "orders.events".into(),
            routing_keys: vec!["order.canceled"],
            runs_in: Process::Consumer,
            retry_delays: vec![
                Duration::from_millis(500),
                Duration::from_secs(10),
                Duration::from_secs(600),
            ],
        };
        assert_eq!(
            worker.retry_queues(),
            vec![
                "refunds.retry.500ms",
                "refunds.retry.10s",
                "refunds.retry.10m"
            ]
        );
        assert_eq!(worker.retry(3), None);
        assert_eq!(worker.dead(), "refunds.dead");
        assert_eq!(worker.failures_exchange(), "refunds.failures");
    }

    fn topology() -> anyhow::Result<Topology> {
        let settings = crate::config::Settings::from_figment(crate::config::Settings::figment(
            &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config"),
            "none",
        ))?;
        Ok(Topology::from_settings(&settings.topology))
    }

    #[test]
    fn the_order_service_reads_refund_events_and_the_consumer_reads_order_events()
    -> anyhow::Result<()> {
        let topology = topology()?;
        let status = topology
            .worker("orders.refund-status")
            .ok_or_else(|| anyhow::anyhow!("no refund-status worker"))?;
        assert_eq!(status.source_exchange, "refunds.events");
        assert_eq!(status.runs_in, Process::Producer);
        assert_eq!(
            status.routing_keys,
            vec!["refund.completed", "refund.failed"]
        );
        let shipping = topology
            .worker("shipping-sync")
            .ok_or_else(|| anyhow::anyhow!("no shipping-sync worker"))?;
        assert_eq!(shipping.source_exchange, "orders.events");
        assert_eq!(shipping.routing_keys, vec!["order.shipping-info-changed"]);
        assert_eq!(
            topology
                .relay_exchanges_of(Process::Consumer)
                .collect::<Vec<_>>(),
            vec!["refunds.events"]
        );
        Ok(())
    }
}
