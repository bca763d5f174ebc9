//! What a process runs beside its HTTP server, as the registry says: a relay
//! for each publisher it relays, and a worker for each queue it consumes.
//! The order service relays order events and takes refund news back to the
//! orders; the consumer relays refund events and acts on order events.
//!
//! If the broker refuses the process's user for any of them, the process is
//! misconfigured as a whole: every task is stopped and the process exits
//! with a configuration error instead of running half its duties.

use std::sync::Arc;

use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    amqp::{BrokerPool, Topology},
    config::{ConfigError, Settings},
    consume::{ConsumerStats, Worker, WorkerConfig, WorkerError, WorkerStats},
    domain::Publisher,
    handlers::HandlerDeps,
    outbox::{Relay, RelayError},
    registry::{self, Process},
    shutdown::Shutdown,
    store::DbPool,
};

/// The broker's words when it refused a relay or worker.
struct Refused(String);

/// A process's relays and workers, running until shutdown.
pub struct Background {
    tasks: JoinSet<Option<Refused>>,
    stats: ConsumerStats,
}

/// Tells the process to stop when the broker refused its user; hand the
/// receiving end to the process's [`Shutdown`].
pub fn refusal_channel() -> (mpsc::Sender<()>, mpsc::Receiver<()>) {
    mpsc::channel(1)
}

impl Background {
    /// Starts every relay and worker of `process`. `refused` is signalled
    /// the moment the broker refuses one of them.
    pub fn start(
        process: Process,
        settings: &Settings,
        db: &DbPool,
        broker: &BrokerPool,
        shutdown: &Shutdown,
        refused: mpsc::Sender<()>,
    ) -> anyhow::Result<Self> {
        let topology = Topology::from_settings(&settings.topology);
        let app_id = app_id(process);
        let mut tasks = JoinSet::new();
        for publisher in Publisher::ALL
            .into_iter()
            .filter(|p| registry::relayed_by(*p) == process)
        {
            let relay = Arc::new(Relay::for_publisher(
                publisher,
                db.clone(),
                broker.clone(),
                topology.clone(),
                settings.relay.clone(),
                app_id,
            ));
            let run = relay.run(settings.database.url(), shutdown.clone());
            let refused = refused.clone();
            tasks.spawn(async move {
                match run.await {
                    Err(RelayError::AccessRefused(detail)) => {
                        let _ = refused.try_send(());
                        Some(Refused(detail))
                    }
                    _ => None,
                }
            });
        }
        let mut stats = ConsumerStats::default();
        let deps = HandlerDeps { db, settings };
        for entry in registry::workers_to_run(process, settings)? {
            let Some(queues) = topology.worker(entry.name).cloned() else {
                anyhow::bail!("worker `{}` has no queues in the topology", entry.name);
            };
            let worker_stats = Arc::new(WorkerStats::new(&queues.retry_queues()));
            stats.add(entry.name, worker_stats.clone());
            let config = WorkerConfig {
                queues,
                topology: topology.clone(),
                settings: settings.consumer.clone(),
                publish_timeout: settings.relay.confirm_timeout,
                shutdown_deadline: settings.shutdown.deadline,
            };
            let worker = Worker::new(
                config,
                Arc::new((entry.build)(&deps)?),
                db.clone(),
                broker.clone(),
                worker_stats,
            );
            let run = worker.run(shutdown.clone());
            let refused = refused.clone();
            tasks.spawn(async move {
                match run.await {
                    Err(WorkerError::AccessRefused(detail)) => {
                        let _ = refused.try_send(());
                        Some(Refused(detail))
                    }
                    Ok(()) => None,
                }
            });
        }
        Ok(Self { tasks, stats })
    }

    /// The workers' counters, by worker name.
    pub fn stats(&self) -> &ConsumerStats {
        &self.stats
    }

    /// Waits until every relay and worker has stopped; the broker's refusal,
    /// if there was one, as the configuration error it is.
    pub async fn join(mut self, settings: &Settings, process: Process) -> Result<(), ConfigError> {
        let mut refused = None;
        while let Some(joined) = self.tasks.join_next().await {
            if let Ok(Some(Refused(detail))) = joined {
                refused.get_or_insert(detail);
            }
        }
        let (user, role) = match process {
            Process::Producer => (&settings.amqp.producer.user, "producer"),
            Process::Consumer => (&settings.amqp.consumer.user, "consumer"),
        };
        match refused {
            Some(detail) => Err(ConfigError::BrokerAccess {
                user: user.clone(),
                role,
                detail,
            }),
            None => Ok(()),
        }
    }
}

/// How `process` names itself to the broker (`app_id`, connection name).
pub fn app_id(process: Process) -> &'static str {
    match process {
        Process::Producer => super::producer::APP_ID,
        Process::Consumer => super::consumer::APP_ID,
    }
}
