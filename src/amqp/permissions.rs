//! The narrowest broker permissions that work for each service, derived from
//! the topology so that adding a worker cannot leave its grant behind.
//!
//! RabbitMQ checks three regular expressions per user and vhost against the
//! name of the exchange or queue an operation touches: `configure` (declare,
//! delete), `write` (publish to an exchange, bind a queue) and `read` (consume,
//! get, purge a queue; bind from an exchange). Passive declares need none.
//!
//! - The producer's relay publishes to the events exchange and nothing else.
//! - The consumer reads its work queues and publishes failure copies through
//!   each worker's own failures exchange, which routes only to that worker's
//!   retry tiers and dead-letter queue. No write on the default exchange: it
//!   would reach every queue.
//! - Neither may configure anything: the topology is the operator's.
//! - The operator (tag `management`) may do everything in the vhost.
//!
//! What RabbitMQ cannot narrow: `read` on a queue lets its consumer purge it
//! too, so the consumer could empty its own work queues (never the
//! dead-letter queues, which it cannot read).

use super::Topology;

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
    pub fn producer(topology: &Topology) -> Self {
        Self {
            configure: NOTHING.to_owned(),
            write: exactly([topology.events_exchange.clone()]),
            read: NOTHING.to_owned(),
        }
    }

    pub fn consumer(topology: &Topology) -> Self {
        Self {
            configure: NOTHING.to_owned(),
            write: exactly(topology.workers.iter().map(|w| w.failures_exchange())),
            read: exactly(topology.workers.iter().map(|w| w.work().to_owned())),
        }
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
        let worker = |name: &str| WorkerQueues {
            name: name.to_owned(),
            routing_keys: vec!["order.canceled"],
            retry_delays: vec![Duration::from_secs(1)],
        };
        Topology {
            events_exchange: "orders.events".into(),
            unrouted_exchange: "orders.unrouted".into(),
            delivery_limit: 10,
            work_queue_max_length: None,
            workers: vec![worker("refunds"), worker("notifications")],
        }
    }

    #[test]
    fn the_producer_may_only_publish_to_the_events_exchange() {
        let grant = Permissions::producer(&topology());
        assert_eq!(grant.write, r"^(orders\.events)$");
        assert_eq!(grant.configure, "^$");
        assert_eq!(grant.read, "^$");
    }

    #[test]
    fn the_consumer_reads_its_work_queues_and_writes_its_failures_exchanges() {
        let grant = Permissions::consumer(&topology());
        assert_eq!(grant.read, r"^(refunds|notifications)$");
        assert_eq!(
            grant.write,
            r"^(refunds\.failures|notifications\.failures)$"
        );
        assert_eq!(grant.configure, "^$");
    }
}
