//! The relay: claims due outbox rows in id order, publishes them on a
//! confirm-mode channel with many in flight, and marks a row published only
//! after an ack that carried no return (P2). A nack, a return, a timeout or a
//! broken channel leaves the row pending with its error and a later
//! `next_attempt_at`.
//!
//! A relay publishes one publisher's rows to that publisher's exchange: the
//! order service runs the `orders` relay, the consumer the `refunds` relay.
//!
//! [`Relay::relay_once`] is one step, for tests; [`Relay::run`] loops. Rows
//! its process's writer hands over right after their commit
//! ([`super::handoff`]) are published without a claim query
//! ([`Relay::relay_handed_once`]); for the rest it is woken when its process
//! commits outbox rows ([`super::wake`]) and polls. Up to `steps_in_flight`
//! steps overlap: one step claims and sends at a time (so rows leave in the
//! order they were claimed or handed), and while its confirms are on their
//! way the next step takes the rows due since, leaving out the rows other
//! steps hold. Each step marks only the rows of its own confirms.

use std::sync::Arc;

use chrono::Utc;
use futures_util::{StreamExt, future::join_all, stream::FuturesUnordered};
use tokio::{
    sync::{Mutex, MutexGuard, watch},
    time::Instant,
};

use super::{
    Handoff,
    backoff::{delay_after, reconnect_delay},
    wake,
};
use crate::{
    amqp::{BrokerPool, ConfirmedPublisher, PublishError, Topology, access_refused, envelope},
    config::RelaySettings,
    domain::Publisher,
    faults::{CrashPoint, crash_point},
    shutdown::Shutdown,
    store::{DbPool, StoreError, outbox},
};

use super::RelayStats;

/// What one relay step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayOutcome {
    /// Nothing was due.
    Idle,
    /// Rows were tried: `published` are confirmed and marked, `failed` stay pending.
    Published { published: usize, failed: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("broker unavailable: {0}")]
    Broker(String),
    /// The broker refused our user; retrying cannot help.
    #[error("broker refused the relay's user: {0}")]
    AccessRefused(String),
}

impl RelayError {
    fn from_broker(error: &dyn std::fmt::Display) -> Self {
        access_refused(error).map_or_else(|| Self::Broker(error.to_string()), Self::AccessRefused)
    }
}

pub struct Relay {
    /// Whose rows this relay publishes.
    source: Publisher,
    db: DbPool,
    broker: BrokerPool,
    topology: Topology,
    settings: RelaySettings,
    app_id: String,
    publisher: Mutex<Option<ConfirmedPublisher>>,
    /// Held by the step that is claiming and sending.
    sending: Mutex<()>,
    /// Rows handed over by this process's writers, and the rows steps hold.
    handoff: Arc<Handoff>,
    stats: Arc<RelayStats>,
}

/// The most rows one step publishes.
fn batch_rows(settings: &RelaySettings) -> usize {
    usize::try_from(settings.batch_size).unwrap_or(1)
}

/// Where a step's rows come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepKind {
    /// Handed over by a writer of this process.
    Handed,
    /// Claimed by a query of the due rows.
    Claim,
}

/// A step's hold on its rows: other steps leave them out until it is dropped.
struct Hold<'a> {
    handoff: &'a Handoff,
    ids: Vec<i64>,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.handoff.release(&self.ids);
    }
}

impl Relay {
    /// The order service's relay.
    pub fn new(
        db: DbPool,
        broker: BrokerPool,
        topology: Topology,
        settings: RelaySettings,
        app_id: &str,
    ) -> Self {
        Self::for_publisher(Publisher::Orders, db, broker, topology, settings, app_id)
    }

    /// The relay of `publisher`'s rows, to its exchange, through `broker`
    /// (which logs in as the user of the process that runs it).
    pub fn for_publisher(
        publisher: Publisher,
        db: DbPool,
        broker: BrokerPool,
        topology: Topology,
        settings: RelaySettings,
        app_id: &str,
    ) -> Self {
        Self {
            source: publisher,
            db,
            broker,
            topology,
            app_id: app_id.to_owned(),
            publisher: Mutex::new(None),
            sending: Mutex::new(()),
            handoff: Arc::new(Handoff::new(
                publisher,
                batch_rows(&settings).saturating_mul(settings.steps_in_flight),
            )),
            settings,
            stats: Arc::default(),
        }
    }

    /// Where this process's writers hand over the rows this relay publishes,
    /// right after their commit.
    pub fn handoff(&self) -> Arc<Handoff> {
        self.handoff.clone()
    }

    /// Whose rows this relay publishes.
    pub fn source(&self) -> Publisher {
        self.source
    }

    /// What this relay did so far, for `/metrics`.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// The open publisher, or a new one on a fresh connection. The events
    /// exchange is checked on every (re)open: a missing topology is reported
    /// as such instead of as a stream of failed publishes.
    async fn publisher(&self) -> Result<ConfirmedPublisher, RelayError> {
        let mut slot = self.publisher.lock().await;
        if let Some(publisher) = slot.as_ref().filter(|p| p.is_open()) {
            return Ok(publisher.clone());
        }
        *slot = None;
        let connection = self
            .broker
            .get()
            .await
            .map_err(|e| RelayError::from_broker(&e))?;
        let publisher = ConfirmedPublisher::open(&connection)
            .await
            .map_err(|e| RelayError::from_broker(&e))?;
        self.topology
            .verify_for_relay(publisher.channel(), self.source)
            .await
            .map_err(|e| {
                RelayError::Broker(format!(
                    "exchange `{}` is missing (run `courier topology apply`): {e}",
                    self.exchange()
                ))
            })?;
        tracing::info!(
            publisher = self.source.as_str(),
            "relay publisher channel open"
        );
        self.stats.count_channel_open();
        *slot = Some(publisher.clone());
        Ok(publisher)
    }

    /// Opens the publisher channel and checks the topology now, instead of
    /// at the first due row; `run` calls it at start.
    pub async fn connect(&self) -> Result<(), RelayError> {
        self.publisher().await.map(drop)
    }

    fn exchange(&self) -> &str {
        self.topology.exchange_of(self.source)
    }

    async fn forget_publisher(&self) {
        *self.publisher.lock().await = None;
    }

    /// One step: publish the due rows (up to `batch_size`) and record each outcome.
    pub async fn relay_once(&self) -> Result<RelayOutcome, RelayError> {
        // No database connection is held while the confirms are awaited:
        // overlapping steps would otherwise take one each.
        let sending = self.sending.lock().await;
        let rows = {
            let mut conn = self.db.get().await.map_err(StoreError::from)?;
            let held = self.handoff.held_ids();
            outbox::due(&mut conn, self.source, self.settings.batch_size, &held).await?
        };
        // A row handed over while the query ran is the hand-off's.
        let rows = self.handoff.hold(rows);
        self.publish(sending, rows).await
    }

    /// One step over the rows handed over ([`Handoff`]), up to `batch_size`,
    /// without a claim query.
    pub async fn relay_handed_once(&self) -> Result<RelayOutcome, RelayError> {
        let sending = self.sending.lock().await;
        let rows = self.handoff.take(batch_rows(&self.settings));
        self.stats.count_handed(rows.len());
        self.publish(sending, rows).await
    }

    /// Publishes the rows a step holds, in order, and records each outcome.
    async fn publish(
        &self,
        sending: MutexGuard<'_, ()>,
        rows: Vec<outbox::OutboxRow>,
    ) -> Result<RelayOutcome, RelayError> {
        let _hold = Hold {
            handoff: &self.handoff,
            ids: rows.iter().map(|r| r.id).collect(),
        };
        if rows.is_empty() {
            return Ok(RelayOutcome::Idle);
        }
        let publisher = self.publisher().await?;

        // All of the step's publishes go out together, still in id order,
        // rather than one write per round trip to the connection's I/O loop.
        let bodies: Vec<String> = rows.iter().map(|row| row.payload.to_string()).collect();
        let results = publisher
            .send_all(
                self.exchange(),
                rows.iter().zip(&bodies).map(|(row, body)| {
                    (
                        row.event_type.as_str(),
                        body.as_bytes(),
                        envelope::properties_for(row, &self.app_id),
                    )
                }),
            )
            .await;
        let mut sent = Vec::with_capacity(rows.len());
        let mut failures: Vec<(&outbox::OutboxRow, String)> = Vec::new();
        for (row, result) in rows.iter().zip(results) {
            match result {
                Ok(pending) => sent.push((row, pending)),
                Err(error) => {
                    // The channel is gone: the rest of the batch waits for
                    // the next step (a later row that did go out is simply
                    // sent again, and the consumers' inbox absorbs it).
                    failures.push((row, error.to_string()));
                    break;
                }
            }
        }
        drop(sending);
        self.stats.count_published(sent.len());
        crash_point(CrashPoint::AfterPublishBeforeConfirm);
        let timeout = self.settings.confirm_timeout;
        let (rows_sent, pendings): (Vec<_>, Vec<_>) = sent.into_iter().unzip();
        let total = pendings.len();
        let arrived = std::sync::atomic::AtomicUsize::new(0);
        let results = join_all(pendings.into_iter().map(|p| async {
            let result = p.settle(timeout).await;
            let n = arrived.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n == 1 && total > 1 {
                crash_point(CrashPoint::MidConfirms);
            }
            result
        }))
        .await;

        let mut published = Vec::new();
        let mut channel_broken = !failures.is_empty();
        for (row, result) in rows_sent.into_iter().zip(results) {
            self.stats.record(&result);
            match result {
                Ok(()) => published.push(row.id),
                Err(error) => {
                    channel_broken |=
                        matches!(error, PublishError::Channel(_) | PublishError::Timeout(_));
                    failures.push((row, error.to_string()));
                }
            }
        }
        if channel_broken {
            self.forget_publisher().await;
        }
        if !published.is_empty() {
            crash_point(CrashPoint::AfterConfirmBeforeMark);
        }
        let refused = failures.iter().find_map(|(_, error)| access_refused(error));

        let mut conn = self.db.get().await.map_err(StoreError::from)?;
        outbox::mark_published(&mut conn, &published).await?;

        for (row, error) in &failures {
            let attempts = u32::try_from(row.attempts).unwrap_or(0);
            let delay = delay_after(
                attempts,
                self.settings.backoff_base,
                self.settings.backoff_max,
            );
            let next =
                Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
            tracing::warn!(
                outbox_id = row.id,
                event_id = %row.event_id,
                order_id = %row.aggregate_id,
                attempts = row.attempts + 1,
                retry_in = ?delay,
                %error,
                "publish not confirmed; the event stays pending"
            );
            outbox::record_failure(&mut conn, row.id, error, next).await?;
        }
        tracing::debug!(
            publisher = self.source.as_str(),
            published = published.len(),
            failed = failures.len(),
            "relay step"
        );
        if let Some(refused) = refused {
            return Err(RelayError::AccessRefused(refused));
        }
        Ok(RelayOutcome::Published {
            published: published.len(),
            failed: failures.len(),
        })
    }

    /// Relays until `shutdown`: steps while there is work, then waits until
    /// rows are handed over ([`Handoff`]), this process commits rows of this
    /// publisher ([`super::wake`]) or the poll interval passes; rows handed
    /// over or committed during a step start the next step at once, beside
    /// it, up to `steps_in_flight`. Steps in progress always finish, so no
    /// confirmed publish is left unmarked by shutdown itself. Returns early
    /// only when the broker refuses our user: the one error no wait heals.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) -> Result<(), RelayError> {
        let mut written = wake::subscribe(self.source);
        let mut handed = self.handoff.subscribe();
        let result = self.relay_until(&mut written, &mut handed, &shutdown).await;
        tracing::info!(publisher = self.source.as_str(), "relay stopped");
        result
    }

    /// A step of either kind, and which it was.
    async fn step(&self, kind: StepKind) -> (StepKind, Result<RelayOutcome, RelayError>) {
        let outcome = match kind {
            StepKind::Handed => self.relay_handed_once().await,
            StepKind::Claim => self.relay_once().await,
        };
        (kind, outcome)
    }

    async fn relay_until(
        &self,
        written: &mut watch::Receiver<u64>,
        handed: &mut watch::Receiver<u64>,
        shutdown: &Shutdown,
    ) -> Result<(), RelayError> {
        match self.connect().await {
            Err(error @ RelayError::AccessRefused(_)) => return Err(error),
            Err(error) => {
                tracing::warn!(%error, "broker not reachable at start; the relay keeps trying");
            }
            Ok(()) => {}
        }
        let mut steps = FuturesUnordered::new();
        let mut failures = 0u32;
        // Whether rows may be due that no step is looking for.
        let mut maybe_due = true;
        // Whether handed rows may be waiting that no step is taking.
        let mut handed_waiting = self.handoff.has_waiting();
        // After a failed step, no new step starts before this.
        let mut paused_until: Option<Instant> = None;
        let mut refused = None;
        loop {
            let stopping = shutdown.is_triggered() || refused.is_some();
            if stopping && steps.is_empty() {
                break;
            }
            let paused = paused_until.is_some_and(|t| Instant::now() < t);
            if !stopping && !paused && steps.len() < self.settings.steps_in_flight {
                if handed_waiting {
                    handed_waiting = false;
                    steps.push(self.step(StepKind::Handed));
                    continue;
                }
                if maybe_due {
                    maybe_due = false;
                    steps.push(self.step(StepKind::Claim));
                    continue;
                }
            }
            let next_look = match paused_until {
                Some(until) if paused => until,
                _ => Instant::now() + self.settings.poll_interval,
            };
            tokio::select! {
                Some((kind, outcome)) = steps.next(), if !steps.is_empty() => {
                    // More may have been handed over than one step takes.
                    handed_waiting |= self.handoff.has_waiting();
                    match outcome {
                        Ok(RelayOutcome::Published { published, failed }) => {
                            failures = 0;
                            // A full claimed batch means more is waiting: go
                            // again at once. Otherwise the next commit (or
                            // poll) starts the next step; when everything due
                            // failed, the failed rows are not due again yet
                            // either.
                            if kind == StepKind::Claim
                                && i64::try_from(published + failed)
                                    .is_ok_and(|n| n >= self.settings.batch_size)
                            {
                                maybe_due = true;
                            }
                        }
                        Ok(RelayOutcome::Idle) => failures = 0,
                        Err(error @ RelayError::AccessRefused(_)) => refused = Some(error),
                        Err(error) => {
                            let delay = reconnect_delay(failures);
                            failures = failures.saturating_add(1);
                            if failures == 1 {
                                tracing::warn!(%error, "relay paused; retrying with backoff");
                            }
                            paused_until = Some(Instant::now() + delay);
                            // The failed step's rows, handed or claimed, are
                            // pending again: a claim finds them.
                            maybe_due = true;
                        }
                    }
                },
                // The senders live as long as the relay: `changed` cannot fail.
                _ = handed.changed(), if !stopping => handed_waiting = true,
                _ = written.changed(), if !stopping => maybe_due = true,
                () = tokio::time::sleep_until(next_look), if !stopping => maybe_due = true,
                () = shutdown.wait(), if !stopping => {}
            }
        }
        refused.map_or(Ok(()), Err)
    }
}
