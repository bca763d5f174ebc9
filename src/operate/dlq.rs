//! `courier dlq`: reading, replaying and purging dead letters as the
//! operator user.
//!
//! Messages are taken from a dead-letter queue with `basic.get` and held
//! unacked while they are looked at; whatever is not replayed or purged is
//! handed back (nack with requeue) at the end, so the queue keeps it. A dead
//! letter leaves its queue only after what replaces it is durable:
//! - replay: its copy is confirmed into the work queue and the audit row is
//!   written, then the dead copy is acked;
//! - purge: the audit row (with headers and body) is written, then it is acked.
//!
//! A crash in between leaves the dead copy where it was; replaying it again
//! is harmless, because the inbox absorbs a message id it has seen and the
//! refund handler refunds an order once.

use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use lapin::{
    BasicProperties, Channel, Connection,
    message::BasicGetMessage,
    options::{BasicAckOptions, BasicGetOptions, BasicNackOptions},
};
use serde::Serialize;
use uuid::Uuid;

use crate::{
    amqp::{
        ConfirmedPublisher, Topology, WorkerQueues,
        connection::connect_as_operator,
        envelope::{self, headers},
        topology::passive_queue,
    },
    config::AmqpSettings,
    handlers::refund,
    store::{
        DbPool,
        dead_letter_actions::{self, Action, NewAction},
        inbox,
    },
};

/// How long a replayed copy may wait for the broker's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// One dead letter, as `courier dlq list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterView {
    pub queue: String,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub order_id: Option<String>,
    /// `transient` (exhausted), `permanent`, `poison`, or `delivery-limit`
    /// when RabbitMQ dead-lettered it itself (a consumer crash loop).
    pub error_kind: String,
    /// Failed handling attempts, from our `x-attempt` header.
    pub attempts: Option<i64>,
    pub first_failed_at: Option<String>,
    pub last_error: Option<String>,
}

impl DeadLetterView {
    fn of(queue: &str, properties: &BasicProperties) -> Self {
        let text = |key| envelope::header_text(properties, key);
        let delivery_limit =
            envelope::last_death_reason(properties).as_deref() == Some("delivery_limit");
        Self {
            queue: queue.to_owned(),
            event_id: properties.message_id().as_ref().map(ToString::to_string),
            event_type: properties.kind().as_ref().map(ToString::to_string),
            order_id: text(headers::AGGREGATE_ID),
            error_kind: if delivery_limit {
                "delivery-limit".to_owned()
            } else {
                text(headers::ERROR_KIND).unwrap_or_else(|| "delivery-limit".to_owned())
            },
            attempts: envelope::header_int(properties, headers::ATTEMPT),
            first_failed_at: text(headers::FIRST_FAILED_AT),
            last_error: text(headers::LAST_ERROR),
        }
    }
}

/// One dead letter in full, as `courier dlq show` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterDetail {
    #[serde(flatten)]
    pub view: DeadLetterView,
    pub properties: serde_json::Value,
    pub headers: serde_json::Value,
    /// The body as JSON when it parses, as text otherwise.
    pub body: serde_json::Value,
}

/// Which dead letters a replay or purge takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    Ids(Vec<String>),
    ErrorKind(String),
}

impl Selection {
    pub fn takes(&self, view: &DeadLetterView) -> bool {
        match self {
            Self::All => true,
            Self::Ids(ids) => view.event_id.as_ref().is_some_and(|id| ids.contains(id)),
            Self::ErrorKind(kind) => &view.error_kind == kind,
        }
    }
}

/// What happened to one dead letter in a replay or purge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    #[serde(flatten)]
    pub letter: DeadLetterView,
    /// `replayed`, `purged`, or with `--dry-run` `would replay`.
    pub done: String,
    /// Why it is harmless (the effect already happened), when it is.
    pub note: Option<String>,
    /// The audit row, when one was written.
    pub audit_id: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("`{0}` is neither a worker nor a dead-letter queue of the topology; known: {1}")]
    UnknownQueue(String, String),
}

/// The operator's connection to the broker and the database.
pub struct Dlq {
    connection: Connection,
    topology: Topology,
    db: DbPool,
    operator: String,
}

impl Dlq {
    pub async fn connect(
        amqp: &AmqpSettings,
        topology: Topology,
        db: DbPool,
    ) -> anyhow::Result<Self> {
        let connection = connect_as_operator(amqp, "courier-dlq").await?;
        let person = std::env::var("SUDO_USER")
            .or_else(|_| std::env::var("USER"))
            .unwrap_or_else(|_| "unknown".to_owned());
        Ok(Self {
            connection,
            topology,
            db,
            operator: format!("{} ({person})", amqp.operator.user),
        })
    }

    /// The worker named `queue`, or whose dead-letter queue `queue` is.
    pub fn worker(&self, queue: &str) -> Result<&WorkerQueues, DlqError> {
        self.topology
            .workers
            .iter()
            .find(|w| w.name == queue || w.dead() == queue)
            .ok_or_else(|| {
                let known: Vec<String> = self
                    .topology
                    .workers
                    .iter()
                    .map(WorkerQueues::dead)
                    .collect();
                DlqError::UnknownQueue(queue.to_owned(), known.join(", "))
            })
    }

    /// The workers `queue` names, or all of them.
    pub fn workers(&self, queue: Option<&str>) -> Result<Vec<WorkerQueues>, DlqError> {
        match queue {
            Some(queue) => Ok(vec![self.worker(queue)?.clone()]),
            None => Ok(self.topology.workers.clone()),
        }
    }

    /// Every dead letter of `worker`, left in its queue.
    pub async fn list(&self, worker: &WorkerQueues) -> anyhow::Result<Vec<DeadLetterView>> {
        let held = Held::take(&self.connection, &worker.dead()).await?;
        let views = held
            .messages
            .iter()
            .map(|m| DeadLetterView::of(&held.queue, &m.delivery.properties))
            .collect();
        held.release().await?;
        Ok(views)
    }

    /// The dead letter with this event id in any dead-letter queue, left there.
    pub async fn show(&self, event_id: &str) -> anyhow::Result<Option<DeadLetterDetail>> {
        for worker in &self.topology.workers {
            let held = Held::take(&self.connection, &worker.dead()).await?;
            let found = held
                .messages
                .iter()
                .find(|m| {
                    m.delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .is_some_and(|id| id.as_str() == event_id)
                })
                .map(|m| detail(&held.queue, m));
            held.release().await?;
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// Sends the selected dead letters of `worker` back to its work queue
    /// with their message ids and a fresh attempt count. With `dry_run`
    /// nothing moves: each outcome says what would happen.
    pub async fn replay(
        &self,
        worker: &WorkerQueues,
        selection: &Selection,
        dry_run: bool,
    ) -> anyhow::Result<Vec<Outcome>> {
        let held = Held::take(&self.connection, &worker.dead()).await?;
        let publisher = ConfirmedPublisher::open(&self.connection).await?;
        let mut outcomes = Vec::new();
        let result = async {
            for (message, letter) in held.selected(selection) {
                let note = self.already_done(worker, &letter).await?;
                if dry_run {
                    outcomes.push(Outcome {
                        letter,
                        done: "would replay".to_owned(),
                        note,
                        audit_id: None,
                    });
                    continue;
                }
                let properties =
                    envelope::replay_copy(&message.delivery.properties, &self.operator, Utc::now());
                publisher
                    .publish(
                        "",
                        worker.work(),
                        &message.delivery.data,
                        properties,
                        CONFIRM_TIMEOUT,
                    )
                    .await
                    .with_context(|| {
                        format!("replaying {:?} into `{}`", letter.event_id, worker.work())
                    })?;
                let outcome = match &note {
                    Some(note) => format!("replayed; harmless: {note}"),
                    None => "replayed".to_owned(),
                };
                let audit_id = self
                    .audit(
                        Action::Replay,
                        &held.queue,
                        Some(worker.work()),
                        &letter,
                        &outcome,
                        message,
                    )
                    .await?;
                held.ack(message).await?;
                outcomes.push(Outcome {
                    letter,
                    done: "replayed".to_owned(),
                    note,
                    audit_id: Some(audit_id),
                });
            }
            anyhow::Ok(())
        }
        .await;
        let _ = publisher.channel().close(200, "replayed".into()).await;
        held.release().await?;
        result.map(|()| outcomes)
    }

    /// Removes the selected dead letters of `worker`, each recorded first
    /// (headers and body) in `dead_letter_actions`.
    ///
    /// `confirm` is asked with how many messages the selection takes, while
    /// they are held; nothing is purged unless it answers true (then the
    /// result is `None`).
    pub async fn purge(
        &self,
        worker: &WorkerQueues,
        selection: &Selection,
        confirm: impl FnOnce(usize) -> bool,
    ) -> anyhow::Result<Option<Vec<Outcome>>> {
        let held = Held::take(&self.connection, &worker.dead()).await?;
        if !confirm(held.selected(selection).count()) {
            held.release().await?;
            return Ok(None);
        }
        let mut outcomes = Vec::new();
        let result = async {
            for (message, letter) in held.selected(selection) {
                let audit_id = self
                    .audit(Action::Purge, &held.queue, None, &letter, "purged", message)
                    .await?;
                held.ack(message).await?;
                outcomes.push(Outcome {
                    letter,
                    done: "purged".to_owned(),
                    note: None,
                    audit_id: Some(audit_id),
                });
            }
            anyhow::Ok(())
        }
        .await;
        held.release().await?;
        result.map(|()| Some(outcomes))
    }

    /// Why replaying this letter changes nothing, if it does not: the
    /// consumer already processed this message id (its inbox), or, for a
    /// refund, the order's refund is already recorded.
    async fn already_done(
        &self,
        worker: &WorkerQueues,
        letter: &DeadLetterView,
    ) -> anyhow::Result<Option<String>> {
        let mut conn = self
            .db
            .get()
            .await
            .context("the database is needed to check and audit")?;
        let message_id = letter
            .event_id
            .as_deref()
            .and_then(|id| Uuid::parse_str(id).ok());
        if let Some(id) = message_id
            && inbox::seen_among(&mut conn, &worker.name, &[id])
                .await?
                .contains(&id)
        {
            return Ok(Some(format!(
                "`{}` already processed this message; the inbox will absorb it",
                worker.name
            )));
        }
        let order_id = letter
            .order_id
            .as_deref()
            .and_then(|id| Uuid::parse_str(id).ok());
        if worker.name == refund::NAME
            && let Some(order) = order_id
            && crate::store::refunds::exists_for_order(&mut conn, order).await?
        {
            return Ok(Some(format!(
                "order {order} is already refunded; the consumer will record it as a duplicate and move no money"
            )));
        }
        Ok(None)
    }

    async fn audit(
        &self,
        action: Action,
        queue: &str,
        target: Option<&str>,
        letter: &DeadLetterView,
        outcome: &str,
        message: &BasicGetMessage,
    ) -> anyhow::Result<i64> {
        let mut conn = self
            .db
            .get()
            .await
            .context("the database is needed to audit")?;
        let row = NewAction {
            action: action.as_str(),
            queue: queue.to_owned(),
            target_queue: target.map(str::to_owned),
            message_id: letter.event_id.clone(),
            event_type: letter.event_type.clone(),
            order_id: letter.order_id.clone(),
            error_kind: Some(letter.error_kind.clone()),
            last_error: letter.last_error.clone(),
            attempts: letter.attempts,
            outcome: outcome.to_owned(),
            operator: self.operator.clone(),
            headers: envelope::headers_json(&message.delivery.properties),
            body: message.delivery.data.clone(),
        };
        Ok(dead_letter_actions::record(&mut conn, &row).await?)
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Every message of one queue, taken with `basic.get` and held unacked.
struct Held {
    queue: String,
    channel: Channel,
    messages: Vec<BasicGetMessage>,
    /// Delivery tags acked so far; the rest is handed back.
    acked: std::sync::Mutex<Vec<u64>>,
}

impl Held {
    async fn take(connection: &Connection, queue: &str) -> anyhow::Result<Self> {
        let channel = connection.create_channel().await?;
        let mut messages = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .with_context(|| format!("reading `{queue}`"))?
        {
            messages.push(message);
        }
        Ok(Self {
            queue: queue.to_owned(),
            channel,
            messages,
            acked: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The held messages `selection` takes, each with its view.
    fn selected<'a>(
        &'a self,
        selection: &'a Selection,
    ) -> impl Iterator<Item = (&'a BasicGetMessage, DeadLetterView)> + 'a {
        self.messages.iter().filter_map(move |message| {
            let letter = DeadLetterView::of(&self.queue, &message.delivery.properties);
            selection.takes(&letter).then_some((message, letter))
        })
    }

    async fn ack(&self, message: &BasicGetMessage) -> anyhow::Result<()> {
        self.channel
            .basic_ack(message.delivery.delivery_tag, BasicAckOptions::default())
            .await
            .with_context(|| format!("acking a message of `{}`", self.queue))?;
        if let Ok(mut acked) = self.acked.lock() {
            acked.push(message.delivery.delivery_tag);
        }
        Ok(())
    }

    /// Hands back every message not acked: one nack covering them all (a
    /// `multiple` nack must name a tag still outstanding).
    async fn release(self) -> anyhow::Result<()> {
        let acked = self.acked.lock().map(|a| a.clone()).unwrap_or_default();
        let last = self
            .messages
            .iter()
            .map(|m| m.delivery.delivery_tag)
            .filter(|tag| !acked.contains(tag))
            .max();
        if let Some(last) = last {
            self.channel
                .basic_nack(
                    last,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await?;
            let released = u32::try_from(self.messages.len() - acked.len()).unwrap_or(u32::MAX);
            self.await_returned(released).await;
        }
        let _ = self.channel.close(200, "released".into()).await;
        Ok(())
    }

    /// A quorum queue counts what a nack handed back as ready a moment after
    /// the nack: wait for it (up to 2 s), so that a command run right after
    /// this one (a replay after a list) sees every message.
    async fn await_returned(&self, released: u32) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            match passive_queue(&self.channel, &self.queue).await {
                Ok(queue) if queue.message_count() < released => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => return,
            }
        }
    }
}

fn detail(queue: &str, message: &BasicGetMessage) -> DeadLetterDetail {
    let properties = &message.delivery.properties;
    let short = |v: &Option<lapin::types::ShortString>| v.as_ref().map(ToString::to_string);
    DeadLetterDetail {
        view: DeadLetterView::of(queue, properties),
        properties: serde_json::json!({
            "message_id": short(properties.message_id()),
            "type": short(properties.kind()),
            "content_type": short(properties.content_type()),
            "correlation_id": short(properties.correlation_id()),
            "app_id": short(properties.app_id()),
            "timestamp": properties.timestamp(),
            "delivery_mode": properties.delivery_mode(),
        }),
        headers: envelope::headers_json(properties),
        body: serde_json::from_slice(&message.delivery.data).unwrap_or_else(|_| {
            serde_json::Value::from(String::from_utf8_lossy(&message.delivery.data).into_owned())
        }),
    }
}
