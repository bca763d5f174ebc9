//! The registry: one entry per worker, the one place that says what it is.
//! Its name (which is also its queue's and its inbox key), the publisher
//! whose exchange feeds it, the event types it is bound to, how its handler
//! is built, which process runs it, and whether its batches wait for company
//! ([`Pace`]). The topology
//! (queues, bindings, grants), the check of `consumer.workers` and the
//! processes all read it, so adding a consumer is its handler's file and one
//! entry here.
//!
//! It also says which process relays which publisher's outbox rows: each
//! publisher's events leave through its own process's broker user.

use crate::{
    config::{ConfigError, Settings},
    domain::{OrderCanceled, Publisher, RefundCompleted, RefundFailed, ShippingInfoChanged},
    gateway::client::GatewayClient,
    handlers::{
        BoxedHandler, HandlerDeps,
        notification::{self, NotificationHandler, Sender},
        recording::RecordingHandler,
        refund::{self, RefundHandler},
        refund_status::{self, RefundStatusRecording},
        shipping_sync::{self, ShippingSync},
    },
};

/// A courier process that runs workers and a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Process {
    /// The order service: the order API, its relay, and the workers that
    /// take the refund context's news back to the orders.
    Producer,
    /// The consumer: the workers that act on order events, and the refund
    /// context's relay.
    Consumer,
}

/// Whether a worker's batch starts with what has arrived or waits for company.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Someone waits on the effect (money moves): a batch starts with the
    /// deliveries that have already arrived and never waits for more.
    AtOnce,
    /// No one waits on the effect to the millisecond: a batch waits up to
    /// `consumer.background_linger` after its first delivery for more, so
    /// fewer commits carry the same work and leave the CPU to the
    /// [`Pace::AtOnce`] workers.
    Gathered,
}

/// Builds a worker's handler from what the process has.
pub type BuildHandler = fn(&HandlerDeps<'_>) -> anyhow::Result<BoxedHandler>;

/// One worker: everything courier knows about it. Every worker retries
/// transient failures through the same delay tiers (`topology.retry_delays`),
/// then shelves the message in its own dead-letter queue.
#[derive(Clone, Copy)]
pub struct WorkerEntry {
    /// The worker's, its work queue's and its inbox's name.
    pub name: &'static str,
    /// Whose events it takes: its queue is bound to that publisher's exchange.
    pub source: Publisher,
    /// The event types it handles, which are its binding keys.
    pub routing_keys: &'static [&'static str],
    pub runs_in: Process,
    pub pace: Pace,
    pub build: BuildHandler,
}

impl std::fmt::Debug for WorkerEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerEntry")
            .field("name", &self.name)
            .field("source", &self.source)
            .field("routing_keys", &self.routing_keys)
            .field("runs_in", &self.runs_in)
            .field("pace", &self.pace)
            .finish_non_exhaustive()
    }
}

/// Every worker courier has.
pub const WORKERS: &[WorkerEntry] = &[
    WorkerEntry {
        name: refund::NAME,
        source: Publisher::Orders,
        routing_keys: &[OrderCanceled::TYPE],
        runs_in: Process::Consumer,
        pace: Pace::AtOnce,
        build: |deps| {
            let gateway = GatewayClient::new(&deps.settings.gateway)?;
            Ok(BoxedHandler::new(RefundHandler::new(
                deps.db.clone(),
                gateway,
            )))
        },
    },
    WorkerEntry {
        name: notification::NAME,
        source: Publisher::Orders,
        routing_keys: &[OrderCanceled::TYPE],
        runs_in: Process::Consumer,
        pace: Pace::Gathered,
        build: |deps| {
            let sender = Sender::from_settings(&deps.settings.notifications)?;
            Ok(BoxedHandler::new(NotificationHandler::new(
                deps.db.clone(),
                sender,
            )))
        },
    },
    WorkerEntry {
        name: shipping_sync::NAME,
        source: Publisher::Orders,
        routing_keys: &[ShippingInfoChanged::TYPE],
        runs_in: Process::Consumer,
        pace: Pace::Gathered,
        build: |deps| {
            let handler = RecordingHandler::<ShippingSync>::new(deps.db.clone());
            Ok(BoxedHandler::new(handler))
        },
    },
    WorkerEntry {
        name: refund_status::NAME,
        source: Publisher::Refunds,
        routing_keys: &[RefundCompleted::TYPE, RefundFailed::TYPE],
        runs_in: Process::Producer,
        pace: Pace::Gathered,
        build: |deps| {
            let handler = RecordingHandler::<RefundStatusRecording>::new(deps.db.clone());
            Ok(BoxedHandler::new(handler))
        },
    },
];

/// The process that relays `publisher`'s outbox rows, as its broker user.
pub fn relayed_by(publisher: Publisher) -> Process {
    match publisher {
        Publisher::Orders => Process::Producer,
        Publisher::Refunds => Process::Consumer,
    }
}

pub fn worker(name: &str) -> Option<&'static WorkerEntry> {
    WORKERS.iter().find(|w| w.name == name)
}

/// The workers `process` runs: for the consumer, those `consumer.workers`
/// names (in that order); the order service runs all of its own.
pub fn workers_to_run(
    process: Process,
    settings: &Settings,
) -> Result<Vec<&'static WorkerEntry>, ConfigError> {
    match process {
        Process::Producer => Ok(WORKERS
            .iter()
            .filter(|w| w.runs_in == Process::Producer)
            .collect()),
        Process::Consumer => settings
            .consumer
            .workers
            .iter()
            .map(|name| {
                worker(name)
                    .filter(|w| w.runs_in == Process::Consumer)
                    .ok_or_else(|| unknown_worker(name))
            })
            .collect(),
    }
}

fn unknown_worker(name: &str) -> ConfigError {
    let known: Vec<&str> = WORKERS
        .iter()
        .filter(|w| w.runs_in == Process::Consumer)
        .map(|w| w.name)
        .collect();
    ConfigError::Invalid {
        key: "consumer.workers".to_owned(),
        reason: format!(
            "unknown consumer worker `{name}`; known: {}",
            known.join(", ")
        ),
    }
}

/// What of the settings only the registry can check: that
/// `consumer.workers` names consumer workers. Every binary runs it at start.
pub fn validate(settings: &Settings) -> Result<(), ConfigError> {
    workers_to_run(Process::Consumer, settings).map(drop)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn only_the_refunds_worker_takes_its_batches_at_once() {
        let at_once: Vec<&str> = WORKERS
            .iter()
            .filter(|w| w.pace == Pace::AtOnce)
            .map(|w| w.name)
            .collect();
        assert_eq!(at_once, [refund::NAME]);
    }

    #[test]
    fn worker_names_are_unique() {
        let names: HashSet<&str> = WORKERS.iter().map(|w| w.name).collect();
        assert_eq!(names.len(), WORKERS.len());
    }

    #[test]
    fn each_worker_takes_only_its_publishers_events() {
        for worker in WORKERS {
            for key in worker.routing_keys {
                let publisher = if key.starts_with("order.") {
                    Publisher::Orders
                } else {
                    Publisher::Refunds
                };
                assert_eq!(publisher, worker.source, "{worker:?}");
            }
        }
    }
}
