//! One worker: consumes its work queue with manual acks, bounded concurrency
//! and a prefetch window, and settles every delivery (P3):
//! - handled, skipped as stale or already in the inbox: ack;
//! - transient failure: confirmed copy into the next delay tier, then ack;
//! - permanent, exhausted or undecodable: the handler's last word first
//!   ([`Handler::before_dead_letter`], durable), then a confirmed copy into
//!   `<queue>.dead` with the reason, then ack;
//! - our database unreachable, or the copy not confirmed: nack with requeue,
//!   so the broker keeps the message.

use std::{collections::HashSet, sync::Arc, time::Duration};

use chrono::Utc;
use futures_util::{FutureExt, Stream, StreamExt, future::join_all};
use lapin::{
    Channel,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    },
    types::FieldTable,
};
use tokio::{
    sync::{Notify, Semaphore},
    task::JoinSet,
};

use super::{
    decision::{Decision, decide},
    decode::{Decoded, Poison, decode},
    stats::WorkerStats,
};
use crate::{
    amqp::{
        BrokerPool, ConfirmedPublisher, Topology, WorkerQueues, access_refused,
        envelope::{self, ErrorKind, FailureStamp, LogIds},
    },
    config::ConsumerSettings,
    faults::{CrashPoint, crash_on_message, crash_point},
    handlers::{Handled, Handler, HandlerError, Shelved, Work},
    outbox::backoff::{delay_after, jittered, reconnect_delay},
    shutdown::Shutdown,
    store::{self, DbPool, StoreError, inbox},
};

/// Pause before handing back a delivery whose failure copy the broker did not
/// confirm, so a struggling broker does not get a hot redelivery loop.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// Everything a worker is configured with.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub queues: WorkerQueues,
    /// Declared at the start of every session, so a broker that lost its
    /// definitions gets them back before we consume.
    pub topology: Topology,
    pub settings: ConsumerSettings,
    /// How long a batch waits after its first delivery for more to join it
    /// (zero for a [`Pace::AtOnce`](crate::registry::Pace::AtOnce) worker).
    pub linger: Duration,
    pub publish_timeout: Duration,
    pub shutdown_deadline: Duration,
}

pub struct Worker<H> {
    config: WorkerConfig,
    handler: Arc<H>,
    db: DbPool,
    broker: BrokerPool,
    stats: Arc<WorkerStats>,
}

/// What to do with a delivery once its outcome is durable (or not).
#[derive(Debug, Clone, Copy)]
enum Settle {
    Ack,
    /// The failure copy was not confirmed: give the broker the message back.
    Requeue,
    /// Our database is unreachable: give it back at once and pause the worker.
    DatabaseDown,
}

/// Why a consume session ended without an error.
enum SessionEnd {
    Shutdown,
    /// Stop taking deliveries until the database answers again.
    DatabaseDown,
    /// The broker refused our user: stop the worker, no retry heals it.
    AccessRefused(String),
}

/// Why a worker stopped before shutdown.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The broker's words, naming the user and the object refused.
    #[error("{0}")]
    AccessRefused(String),
}

struct Shared<H> {
    queues: WorkerQueues,
    handler: Arc<H>,
    db: DbPool,
    publisher: ConfirmedPublisher,
    max_body_bytes: usize,
    handler_timeout: Duration,
    publish_timeout: Duration,
    stats: Arc<WorkerStats>,
    database_down: Notify,
    /// Set once when the broker refuses a failure copy for lack of permission.
    refused: std::sync::Mutex<Option<String>>,
    refused_notify: Notify,
}

impl<H: Handler> Worker<H> {
    pub fn new(
        config: WorkerConfig,
        handler: Arc<H>,
        db: DbPool,
        broker: BrokerPool,
        stats: Arc<WorkerStats>,
    ) -> Self {
        Self {
            config,
            handler,
            db,
            broker,
            stats,
        }
    }

    /// Consumes until `shutdown`, reconnecting with backoff when the broker
    /// connection or channel is lost, and pausing while the database is down
    /// (deliveries go back to the queue without spending a retry tier).
    /// Returns early only when the broker refuses our user.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), WorkerError> {
        let worker = self.config.queues.work().to_owned();
        let mut failures = 0u32;
        while !shutdown.is_triggered() {
            match self.session(&shutdown).await {
                Ok(SessionEnd::Shutdown) => break,
                Ok(SessionEnd::AccessRefused(refused)) => {
                    tracing::error!(worker, %refused, "broker refused the consumer's user; stopping");
                    return Err(WorkerError::AccessRefused(refused));
                }
                Ok(SessionEnd::DatabaseDown) => {
                    tracing::warn!(
                        worker,
                        "database unavailable; consumption paused until it answers"
                    );
                    self.wait_for_database(&shutdown).await;
                    if !shutdown.is_triggered() {
                        tracing::info!(worker, "database answers again; resuming");
                    }
                }
                Err(error) => {
                    if let Some(refused) = access_refused(&error) {
                        tracing::error!(worker, %refused, "broker refused the consumer's user; stopping");
                        return Err(WorkerError::AccessRefused(refused));
                    }
                    let delay = reconnect_delay(failures);
                    failures = failures.saturating_add(1);
                    WorkerStats::bump(&self.stats.reconnects);
                    tracing::warn!(worker, %error, retry_in = ?delay, "consumer session ended; reconnecting");
                    shutdown.sleep(delay).await;
                    continue;
                }
            }
            failures = 0;
        }
        tracing::info!(worker, "worker stopped");
        Ok(())
    }

    async fn wait_for_database(&self, shutdown: &Shutdown) {
        let mut attempt = 0u32;
        while !shutdown.is_triggered() {
            if store::ping(&self.db).await.is_ok() {
                return;
            }
            let delay = jittered(delay_after(
                attempt,
                Duration::from_millis(200),
                Duration::from_secs(5),
            ));
            attempt = attempt.saturating_add(1);
            shutdown.sleep(delay).await;
        }
    }

    async fn session(&self, shutdown: &Shutdown) -> anyhow::Result<SessionEnd> {
        let connection = self
            .broker
            .get()
            .await
            .map_err(|e| anyhow::anyhow!("broker unavailable: {e}"))?;
        let channel = connection.create_channel().await?;
        self.config
            .topology
            .verify_for_worker(&channel, &self.config.queues)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "queue `{}` or exchange `{}` is missing (run `courier topology apply`): {e}",
                    self.config.queues.work(),
                    self.config.queues.failures_exchange()
                )
            })?;
        channel
            .basic_qos(self.config.settings.prefetch, BasicQosOptions::default())
            .await?;
        let publisher = ConfirmedPublisher::open(&connection).await?;
        let tag = format!("{}-{}", self.config.queues.work(), std::process::id());
        let mut consumer = channel
            .basic_consume(
                self.config.queues.work().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(
            worker = self.config.queues.work(),
            prefetch = self.config.settings.prefetch,
            concurrency = self.config.settings.concurrency,
            linger = ?self.config.linger,
            "consuming"
        );

        let shared = Arc::new(Shared {
            queues: self.config.queues.clone(),
            handler: self.handler.clone(),
            db: self.db.clone(),
            publisher,
            max_body_bytes: self.config.settings.max_body_bytes,
            handler_timeout: self.config.settings.handler_timeout,
            publish_timeout: self.config.publish_timeout,
            stats: self.stats.clone(),
            database_down: Notify::new(),
            refused: std::sync::Mutex::new(None),
            refused_notify: Notify::new(),
        });
        let permits = Arc::new(Semaphore::new(self.config.settings.concurrency));
        let batch_size = self.config.settings.batch_size;
        let batches_in_flight = self.config.settings.batches_in_flight;
        let linger = self.config.linger;
        let mut in_flight = JoinSet::new();
        let ended = loop {
            tokio::select! {
                biased;
                () = shutdown.wait() => break Ok(SessionEnd::Shutdown),
                () = shared.database_down.notified() => break Ok(SessionEnd::DatabaseDown),
                () = shared.refused_notify.notified() => {
                    let refused = shared.refused.lock().ok().and_then(|mut r| r.take()).unwrap_or_default();
                    break Ok(SessionEnd::AccessRefused(refused));
                }
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                // Only take a delivery we have room for: one left unstarted
                // goes back to the queue on close. While the batches in
                // flight are full, arrivals wait and form the next batch
                // together: under load each commit carries more deliveries.
                next = consumer.next(), if permits.available_permits() > 0
                    && in_flight.len() < batches_in_flight => match next {
                    None => break Err(anyhow::anyhow!("consumer stream ended")),
                    Some(Err(error)) => break Err(error.into()),
                    Some(Ok(delivery)) => {
                        let mut permit = permits.clone().try_acquire_owned()?;
                        let mut batch = vec![delivery];
                        // Whatever else has already arrived joins this batch,
                        // so a busy queue shares commits. A quiet one waits
                        // for company only for the linger, which is zero
                        // where someone waits on the effect.
                        let gathered_until =
                            (!linger.is_zero()).then(|| tokio::time::Instant::now() + linger);
                        let mut stream_end = None;
                        while batch.len() < batch_size {
                            let Ok(more) = permits.clone().try_acquire_owned() else { break };
                            match next_by(&mut consumer, gathered_until, shutdown).await {
                                Some(Some(Ok(delivery))) => {
                                    permit.merge(more);
                                    batch.push(delivery);
                                }
                                Some(end) => {
                                    stream_end = Some(end);
                                    break;
                                }
                                None => break,
                            }
                        }
                        let shared = shared.clone();
                        in_flight.spawn(async move {
                            shared.process_batch(batch).await;
                            drop(permit);
                        });
                        match stream_end {
                            None => {}
                            Some(None) => break Err(anyhow::anyhow!("consumer stream ended")),
                            Some(Some(Err(error))) => break Err(error.into()),
                            Some(Some(Ok(_))) => unreachable!("taken into the batch above"),
                        }
                    }
                },
            }
        };
        if ended.is_ok() {
            // Stop new deliveries first, then let in-flight ones settle.
            let _ = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
        drain(&mut in_flight, self.config.shutdown_deadline).await;
        // Closing waits for close-ok, which the broker sends only after every
        // ack before it on the channel: no ack is lost to a quick exit. The
        // connection is pooled and outlives the session, so the publisher's
        // channel is closed too rather than left open on it.
        close(&channel).await;
        close(shared.publisher.channel()).await;
        ended
    }
}

/// The next delivery if one has arrived, or arrives before `until` when the
/// worker lingers (`Some`); `None` once that is past, or at shutdown.
async fn next_by<S: Stream + Unpin>(
    consumer: &mut S,
    until: Option<tokio::time::Instant>,
    shutdown: &Shutdown,
) -> Option<Option<S::Item>> {
    let Some(until) = until else {
        return consumer.next().now_or_never();
    };
    // A timeout polls its future before its deadline, so a linger that is
    // over still takes what has already arrived.
    tokio::select! {
        biased;
        () = shutdown.wait() => None,
        next = tokio::time::timeout_at(until, consumer.next()) => next.ok(),
    }
}

async fn drain(in_flight: &mut JoinSet<()>, deadline: Duration) {
    let all_done = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(deadline, all_done).await.is_err() {
        tracing::warn!(
            left = in_flight.len(),
            "deadline passed with deliveries in flight; they will be redelivered"
        );
        in_flight.abort_all();
    }
}

async fn close(channel: &Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "worker stopping".into()).await;
    }
}

impl<H: Handler> Shared<H> {
    async fn process_batch(&self, deliveries: Vec<Delivery>) {
        self.stats.count_received(deliveries.len());
        let settles = self.outcomes(&deliveries).await;
        join_all(
            deliveries
                .iter()
                .zip(settles)
                .map(|(delivery, settle)| self.settle(delivery, settle)),
        )
        .await;
    }

    /// Acks each delivery by its own outcome, never one for another.
    async fn settle(&self, delivery: &Delivery, settle: Settle) {
        let result = match settle {
            Settle::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
            Settle::DatabaseDown => {
                WorkerStats::bump(&self.stats.requeued);
                self.database_down.notify_one();
                requeue(delivery).await
            }
            Settle::Requeue => {
                WorkerStats::bump(&self.stats.requeued);
                tokio::time::sleep(REQUEUE_PAUSE).await;
                requeue(delivery).await
            }
        };
        if let Err(error) = result {
            // The channel is gone; the broker redelivers, the inbox absorbs it.
            let ids = LogIds::of(&delivery.properties);
            tracing::warn!(consumer = self.handler.name(), event_id = %ids.event_id, order_id = %ids.order_id, %error, "could not settle a delivery");
        }
    }

    /// Counted, and logged: the failure tests read this line as proof that a
    /// committed delivery came back.
    fn absorbed_duplicate(&self, delivery: &Delivery) {
        WorkerStats::bump(&self.stats.duplicates);
        let ids = LogIds::of(&delivery.properties);
        tracing::info!(consumer = self.handler.name(), event_id = %ids.event_id, order_id = %ids.order_id, "duplicate delivery absorbed");
    }

    /// One settle per delivery, in order. Undecodable deliveries are failed
    /// on their own; the rest go through the inbox and the handler as one
    /// batch, except that a message id repeated within the batch waits for
    /// a later round, where the inbox sees the first copy's outcome.
    async fn outcomes(&self, deliveries: &[Delivery]) -> Vec<Settle> {
        let mut settles: Vec<Option<Settle>> = deliveries.iter().map(|_| None).collect();
        let mut decoded = Vec::new();
        let mut poison = Vec::new();
        for (i, delivery) in deliveries.iter().enumerate() {
            match decode(&delivery.properties, &delivery.data, self.max_body_bytes) {
                Ok(ok) => {
                    crash_on_message(Some(ok.message_id));
                    if delivery.redelivered {
                        let ids = LogIds::of(&delivery.properties);
                        tracing::info!(consumer = self.handler.name(), event_id = %ids.event_id, order_id = %ids.order_id, "redelivered delivery");
                    }
                    decoded.push((i, ok));
                }
                Err(bad) => {
                    crash_on_message(
                        delivery
                            .properties
                            .message_id()
                            .as_ref()
                            .map(|m| m.as_str()),
                    );
                    poison.push((i, bad));
                }
            }
        }
        let failed = join_all(poison.iter().map(|(i, bad): &(usize, Poison)| {
            let decision = decide(bad.previous_failures, ErrorKind::Poison, self.tiers());
            self.publish_failure(&deliveries[*i], decision, ErrorKind::Poison, &bad.reason)
        }))
        .await;
        for ((i, _), settle) in poison.iter().zip(failed) {
            settles[*i] = Some(settle);
        }
        while !decoded.is_empty() {
            let mut ids = HashSet::new();
            let (round, later): (Vec<_>, Vec<_>) = decoded
                .into_iter()
                .partition(|(_, d)| ids.insert(d.message_id));
            for (i, settle) in self.round(deliveries, &round).await {
                settles[i] = Some(settle);
            }
            decoded = later;
        }
        settles
            .into_iter()
            .map(|s| s.unwrap_or(Settle::Requeue))
            .collect()
    }

    /// One batch of distinct message ids: the inbox check in one query, the
    /// handler for what is new, then each outcome turned into its settle.
    async fn round(
        &self,
        deliveries: &[Delivery],
        round: &[(usize, Decoded)],
    ) -> Vec<(usize, Settle)> {
        let ids: Vec<uuid::Uuid> = round.iter().map(|(_, d)| d.message_id).collect();
        let seen = async {
            if self.handler.checks_inbox_itself() {
                return Ok(HashSet::new());
            }
            let mut conn = self.db.get().await.map_err(StoreError::from)?;
            inbox::seen_among(&mut conn, self.handler.name(), &ids).await
        };
        let seen = match seen.await {
            Ok(seen) => seen,
            Err(error) => {
                tracing::warn!(worker = self.queues.work(), %error, "inbox check failed; handing the deliveries back");
                let settle = if error.is_unavailable() {
                    Settle::DatabaseDown
                } else {
                    Settle::Requeue
                };
                return round.iter().map(|(i, _)| (*i, settle)).collect();
            }
        };
        let mut settled = Vec::with_capacity(round.len());
        let mut fresh = Vec::with_capacity(round.len());
        for (i, d) in round {
            if seen.contains(&d.message_id) {
                self.absorbed_duplicate(&deliveries[*i]);
                settled.push((*i, Settle::Ack));
            } else {
                crash_point(CrashPoint::BeforeEffect);
                fresh.push((*i, d));
            }
        }
        if fresh.is_empty() {
            return settled;
        }
        let work: Vec<Work<'_>> = fresh
            .iter()
            .map(|(_, d)| Work {
                message_id: d.message_id,
                event: &d.event,
            })
            .collect();
        self.stats.count_batch(work.len());
        let started = std::time::Instant::now();
        let outcomes = self.handler.handle_batch(&work, self.handler_timeout).await;
        self.stats.observe_handler(started.elapsed(), work.len());
        if fresh.len() > 1 && outcomes.iter().any(|o| matches!(o, Ok(Handled::Done))) {
            crash_point(CrashPoint::AfterBatchCommit);
        }
        let settles = join_all(
            fresh
                .iter()
                .zip(outcomes)
                .map(|((i, d), outcome)| async move {
                    (*i, self.settle_for(&deliveries[*i], d, outcome).await)
                }),
        )
        .await;
        settled.extend(settles);
        settled
    }

    async fn settle_for(
        &self,
        delivery: &Delivery,
        decoded: &Decoded,
        outcome: Result<Handled, HandlerError>,
    ) -> Settle {
        match outcome {
            Ok(Handled::Done) => {
                crash_point(CrashPoint::AfterCommit);
                WorkerStats::bump(&self.stats.handled);
                Settle::Ack
            }
            Ok(Handled::AlreadyProcessed) => {
                self.absorbed_duplicate(delivery);
                Settle::Ack
            }
            Ok(Handled::Skipped) => {
                WorkerStats::bump(&self.stats.skipped);
                Settle::Ack
            }
            Err(HandlerError::Unavailable(error)) => {
                let ids = LogIds::of(&delivery.properties);
                tracing::warn!(consumer = self.handler.name(), event_id = %ids.event_id, order_id = %ids.order_id, %error, "database unavailable; handing the delivery back");
                Settle::DatabaseDown
            }
            Err(HandlerError::Transient(error)) => {
                self.fail(delivery, decoded, ErrorKind::Transient, &error)
                    .await
            }
            Err(HandlerError::Permanent(error)) => {
                self.fail(delivery, decoded, ErrorKind::Permanent, &error)
                    .await
            }
        }
    }

    fn tiers(&self) -> usize {
        self.queues.retry_delays.len()
    }

    /// Sends a failed delivery where [`decide`] says. One that is about to be
    /// shelved gets its handler's last word first; if that cannot be made
    /// durable, the delivery is handed back rather than shelved without it.
    async fn fail(
        &self,
        delivery: &Delivery,
        decoded: &Decoded,
        kind: ErrorKind,
        error: &str,
    ) -> Settle {
        let decision = decide(decoded.previous_failures, kind, self.tiers());
        if let Decision::DeadLetter {
            attempt, exhausted, ..
        } = decision
        {
            let work = Work {
                message_id: decoded.message_id,
                event: &decoded.event,
            };
            let shelved = if exhausted {
                Shelved::Exhausted {
                    attempts: attempt,
                    error,
                }
            } else {
                Shelved::Permanent { error }
            };
            if let Err(last_word) = self.handler.before_dead_letter(work, shelved).await {
                let ids = LogIds::of(&delivery.properties);
                tracing::warn!(consumer = self.handler.name(), event_id = %ids.event_id, order_id = %ids.order_id, %last_word, "could not record the failure before shelving; handing the delivery back");
                return match last_word {
                    HandlerError::Unavailable(_) => Settle::DatabaseDown,
                    _ => Settle::Requeue,
                };
            }
        }
        self.publish_failure(delivery, decision, kind, error).await
    }

    /// Publishes the failure copy where `decision` says, confirmed, before the
    /// original is acked. If the copy is not confirmed the original is requeued.
    async fn publish_failure(
        &self,
        delivery: &Delivery,
        decision: Decision,
        kind: ErrorKind,
        error: &str,
    ) -> Settle {
        let ids = LogIds::of(&delivery.properties);
        let (target, attempt) = match decision {
            Decision::Retry { tier, attempt } => match self.queues.retry(tier) {
                Some(queue) => (queue, attempt),
                None => (self.queues.dead(), attempt),
            },
            Decision::DeadLetter { attempt, .. } => (self.queues.dead(), attempt),
        };
        let stamp = FailureStamp {
            attempt,
            kind,
            error,
            consumer: self.handler.name(),
            now: Utc::now(),
        };
        let properties = envelope::failure_copy(
            &delivery.properties,
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            &stamp,
        );
        if let Err(publish_error) = self
            .publisher
            .publish(
                &self.queues.failures_exchange(),
                &target,
                &delivery.data,
                properties,
                self.publish_timeout,
            )
            .await
        {
            tracing::warn!(consumer = self.handler.name(), event_id = %ids.event_id, order_id = %ids.order_id, queue = %target, %publish_error, "failure copy not confirmed; requeueing the original");
            if let Some(refused) = access_refused(&publish_error)
                && let Ok(mut slot) = self.refused.lock()
            {
                slot.get_or_insert(refused);
                self.refused_notify.notify_one();
            }
            return Settle::Requeue;
        }
        match decision {
            Decision::Retry { tier, .. } => {
                self.stats.count_retry(tier);
                tracing::info!(consumer = self.handler.name(), event_id = %ids.event_id, order_id = %ids.order_id, queue = %target, attempt, %error, "retrying later");
            }
            Decision::DeadLetter {
                kind, exhausted, ..
            } => {
                let counter = match (kind, exhausted) {
                    (ErrorKind::Poison, _) => &self.stats.dead_poison,
                    (_, true) => &self.stats.dead_exhausted,
                    _ => &self.stats.dead_permanent,
                };
                WorkerStats::bump(counter);
                tracing::warn!(consumer = self.handler.name(), event_id = %ids.event_id, order_id = %ids.order_id, queue = %target, kind = kind.as_str(), attempt, %error, "dead-lettered");
            }
        }
        Settle::Ack
    }
}

async fn requeue(delivery: &Delivery) -> Result<bool, lapin::Error> {
    delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await
}
