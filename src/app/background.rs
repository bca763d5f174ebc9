//! What a process runs beside its HTTP server, as the registry says: a relay
//! for each publisher it relays, and a worker for each queue it consumes.
//! The order service relays order events and takes refund news back to the
//! orders; the consumer relays refund events and acts on order events.
//!
//! If the broker refuses the process's user for any of them, the process is
//! misconfigured as a whole: every task is stopped and the process exits
//! with a configuration error instead of running half its duties.

use std::{sync::Arc, time::Duration};

use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    amqp::{BrokerPool, Topology, broker_pool_sized},
    config::{BrokerUser, ConfigError, Settings},
    consume::{ConsumerStats, Worker, WorkerConfig, WorkerError, WorkerStats},
    domain::Publisher,
    handlers::HandlerDeps,
    outbox::{Handoff, Relay, RelayError},
    registry::{self, Pace, Process},
    shutdown::Shutdown,
    store::{self, DbPool},
};

/// The broker's words when it refused a relay or worker.
struct Refused(String);

/// A process's relays and workers, running until shutdown.
pub struct Background {
    process: Process,
    tasks: JoinSet<Option<Refused>>,
    stats: ConsumerStats,
    relays: Vec<Arc<Relay>>,
    broker: BrokerPool,
}

impl Background {
    /// Starts every relay and worker of `process`, as its broker user, until
    /// `shutdown` resolves or the broker refuses the user; returns them and
    /// the process's [`Shutdown`], which fires on either.
    pub fn start(
        process: Process,
        settings: &Settings,
        db: &DbPool,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<(Self, Shutdown)> {
        let (refused, mut refusal) = mpsc::channel::<()>(1);
        let shutdown = Shutdown::on(async move {
            tokio::select! {
                () = shutdown => {}
                _ = refusal.recv() => {}
            }
        });
        let workers = registry::workers_to_run(process, settings)?;
        // A connection per worker session, and one the relays borrow.
        let broker = broker_pool_sized(
            &settings.amqp,
            user_of(process, settings).0,
            app_id(process),
            workers.len() + 1,
        )?;
        let topology = Topology::from_settings(&settings.topology);
        // The relays' connections are their own: a step that waits for a
        // worker's connection to come back delays every event behind it.
        // Claims are taken one at a time and marks are short, so two do.
        let mut relay_settings = settings.database.clone();
        relay_settings.pool_size = relay_settings.pool_size.min(2);
        let relay_db = store::relay_pool(&relay_settings)?;
        let mut tasks = JoinSet::new();
        let mut relays = Vec::new();
        for publisher in Publisher::ALL
            .into_iter()
            .filter(|p| registry::relayed_by(*p) == process)
        {
            let relay = Arc::new(Relay::for_publisher(
                publisher,
                relay_db.clone(),
                broker.clone(),
                topology.clone(),
                settings.relay.clone(),
                app_id(process),
            ));
            relays.push(relay.clone());
            let run = relay.run(shutdown.clone());
            tasks.spawn(watched(refused.clone(), async move {
                match run.await {
                    Err(RelayError::AccessRefused(detail)) => Some(detail),
                    _ => None,
                }
            }));
        }
        let mut stats = ConsumerStats::default();
        let deps = HandlerDeps { db, settings };
        for entry in workers {
            let Some(queues) = topology.worker(entry.name).cloned() else {
                anyhow::bail!("worker `{}` has no queues in the topology", entry.name);
            };
            let worker_stats = Arc::new(WorkerStats::new(&queues.retry_queues()));
            stats.add(entry.name, worker_stats.clone());
            let config = WorkerConfig {
                queues,
                topology: topology.clone(),
                settings: settings.consumer.clone(),
                linger: match entry.pace {
                    Pace::AtOnce => Duration::ZERO,
                    Pace::Gathered => settings.consumer.background_linger,
                },
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
            tasks.spawn(watched(refused.clone(), async move {
                run.await
                    .err()
                    .map(|WorkerError::AccessRefused(detail)| detail)
            }));
        }
        Ok((
            Self {
                process,
                tasks,
                stats,
                relays,
                broker,
            },
            shutdown,
        ))
    }

    /// Where this process's writers hand over `publisher`'s rows, if this
    /// process relays them.
    pub fn handoff(&self, publisher: Publisher) -> Option<Arc<Handoff>> {
        self.relays
            .iter()
            .find(|relay| relay.source() == publisher)
            .map(|relay| relay.handoff())
    }

    /// The workers' counters, by worker name.
    pub fn stats(&self) -> &ConsumerStats {
        &self.stats
    }

    /// `/metrics` and `/readyz` over this process's relays, workers, broker
    /// pool and `db`.
    pub fn observe_routes(
        &self,
        db: &DbPool,
        gauges: Vec<crate::observe::metrics::ServiceGauge>,
    ) -> axum::Router {
        crate::observe::routes(
            self.relays
                .iter()
                .map(|relay| (relay.source(), relay.stats()))
                .collect(),
            self.stats.clone(),
            gauges,
            self.broker.clone(),
            db.clone(),
        )
    }

    /// Waits until every relay and worker has stopped; the broker's refusal,
    /// if there was one, as the configuration error it is.
    pub async fn join(mut self, settings: &Settings) -> Result<(), ConfigError> {
        let mut refused = None;
        while let Some(joined) = self.tasks.join_next().await {
            if let Ok(Some(Refused(detail))) = joined {
                refused.get_or_insert(detail);
            }
        }
        let (user, role) = user_of(self.process, settings);
        match refused {
            Some(detail) => Err(ConfigError::BrokerAccess {
                user: user.user.clone(),
                role,
                detail,
            }),
            None => Ok(()),
        }
    }
}

/// Runs a relay or worker; if the broker refused it, tells the process to
/// stop and hands back the broker's words.
async fn watched(
    refused: mpsc::Sender<()>,
    run: impl Future<Output = Option<String>>,
) -> Option<Refused> {
    let detail = run.await?;
    let _ = refused.try_send(());
    Some(Refused(detail))
}

/// Who `process` logs in to the broker as, and that login's settings key.
fn user_of(process: Process, settings: &Settings) -> (&BrokerUser, &'static str) {
    match process {
        Process::Producer => (&settings.amqp.producer, "producer"),
        Process::Consumer => (&settings.amqp.consumer, "consumer"),
    }
}

/// How `process` names itself to the broker (`app_id`, connection name).
pub fn app_id(process: Process) -> &'static str {
    match process {
        Process::Producer => super::producer::APP_ID,
        Process::Consumer => super::consumer::APP_ID,
    }
}
