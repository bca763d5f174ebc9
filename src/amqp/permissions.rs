//! The narrowest broker permissions that work for each service, derived from
//! the topology so that adding a worker cannot leave its grant behind.
//!
//! RabbitMQ checks three regular expressions per user and vhost against the
//! name of the exchange or queue an operation touches: `configure` (declare,
//! delete), `write` (publish to an exchange, bind a queue) and `read` (consume,
//! get, purge a queue; bind from an exchange). Passive declares need none.
//!
//! - Each service's relay publishes to its own publisher's events exchange
//!   and no other: the order service's to `orders.events`, the consumer's
//!   (the refund context's) to `refunds.events`. So only the order service
//!   can publish order events, and only the refund side refund events.
//! - Each service reads the work queues of the workers it runs (the registry
//!   says which) and publishes their failure copies through each worker's own
//!   failures exchange, which routes only to that worker's retry tiers and
//!   dead-letter queue. No write on the default exchange: it would reach
//!   every queue.
//! - Neither may configure anything: the topology is the operator's.
//! - The operator (tag `management`) may do everything in the vhost.
//!
//! What RabbitMQ cannot narrow: `read` on a queue lets its consumer purge it
//! too, so the consumer could empty its own work queues (never the
//! dead-letter queues, which it cannot read).

use super::Topology;
use crate::registry::Process;

/// One user's grant on the vhost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// Matches nothing: RabbitMQ has no empty resource name to match.
const NOTHING: &str = "^$";
const EVERYTHING: &str = ".*";

impl Permissions {
    /// What the process running `process`'s relays and workers needs.
    pub fn service(topology: &Topology, process: Process) -> Self {
        let workers = || topology.workers_in(process);
        Self {
            configure: NOTHING.to_owned(),
            write: exactly(
                topology
                    .relay_exchanges_of(process)
                    .map(str::to_owned)
                    .chain(workers().map(|w| w.failures_exchange())),
            ),
            read: exactly(workers().map(|w| w.work().to_owned())),
        }
    }

    pub fn producer(topology: &Topology) -> Self {
        Self::service(topology, Process::Producer)
    }

    pub fn consumer(topology: &Topology) -> Self {
        Self::service(topology, Process::Consumer)
    }

    pub fn operator() -> Self {
        Self {
            configure: EVERYTHING.to_owned(),
            write: EVERYTHING.to_owned(),
            read: EVERYTHING.to_owned(),
        }
    }
}

/// A regular expression matching exactly these names.
pub(crate) fn exactly(names: impl IntoIterator<Item = String>) -> String {
    let alternatives: Vec<String> = names.into_iter().map(|n| escape(&n)).collect();
    if alternatives.is_empty() {
        return NOTHING.to_owned();
    }
    format!("^({})$", alternatives.join("|"))
}

fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() * 2);
    for c in name.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::amqp::WorkerQueues;

    fn topology() -> Topology {
        let worker = |name: &str, source: &str, runs_in: Process| WorkerQueues {
            name: name.to_owned(),
            source_exchange: source.to_owned(),
            routing_keys: vec!["order.canceled"],
            retry_delays: vec![Duration::from_secs(1)],
            runs_in,
        };
        Topology {
            events_exchange: "orders.events".into(),
            unrouted_exchange: "orders.unrouted".into(),
            refund_events_exchange: "refunds.events".into(),
            refund_unrouted_exchange: "refunds.unrouted".into(),
            delivery_limit: 10,
            work_queue_max_length: None,
            workers: vec![
                worker("refunds", "orders.events", Process::Consumer),
                worker("notifications", "orders.events", Process::Consumer),
                worker("orders.refund-status", "refunds.events", Process::Producer),
            ],
        }
    }

    #[test]
    fn the_producer_publishes_order_events_and_reads_only_its_own_workers_queue() {
        let grant = Permissions::producer(&topology());
        assert_eq!(
            grant.write,
            r"^(orders\.events|orders\.refund-status\.failures)$"
        );
        assert_eq!(grant.read, r"^(orders\.refund-status)$");
        assert_eq!(grant.configure, "^$");
    }

    #[test]
    fn the_consumer_publishes_refund_events_reads_its_work_queues_and_writes_its_failures_exchanges()
     {
        let grant = Permissions::consumer(&topology());
        assert_eq!(grant.read, r"^(refunds|notifications)$");
        assert_eq!(
            grant.write,
            r"^(refunds\.events|refunds\.failures|notifications\.failures)$"
        );
        assert_eq!(grant.configure, "^$");
    }
}
