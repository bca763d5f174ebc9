//! The notification handler: tells the customer their order was canceled,
//! through a pluggable sender, then records the message ids of a batch in the
//! inbox with one statement.
//!
//! A crash between sending and recording means the customer may get the
//! message twice; an e-mail cannot share a transaction with our database, and
//! we prefer a duplicate e-mail to a lost one.

use std::{path::PathBuf, time::Duration};

use futures_util::future::join_all;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use super::{Handled, Handler, HandlerError, Outcomes, Work, within};
use crate::{
    config::{NotificationSettings, SenderKind},
    domain::IncomingEvent,
    store::{DbPool, StoreError, inbox},
};

pub const NAME: &str = "notifications";

/// A message to a customer.
#[derive(Debug, Clone, Serialize)]
pub struct Notification {
    pub message_id: Uuid,
    pub to: String,
    pub subject: String,
    pub body: String,
}

/// Where notifications go.
pub enum Sender {
    /// Appends one JSON line per notification (the default; easy to inspect).
    File(PathBuf),
    /// Only logs them.
    Log,
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        from: lettre::message::Mailbox,
    },
}

impl Sender {
    pub fn from_settings(settings: &NotificationSettings) -> anyhow::Result<Self> {
        Ok(match settings.sender {
            SenderKind::File => Self::File(settings.file_path.clone()),
            SenderKind::Log => Self::Log,
            SenderKind::Smtp => Self::Smtp {
                transport: AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(
                    &settings.smtp_host,
                )
                .port(settings.smtp_port)
                .build(),
                from: settings.from.parse().map_err(|e| {
                    anyhow::anyhow!("configuration key `notifications.from` is invalid: {e}")
                })?,
            },
        })
    }

    pub async fn send(&self, notification: &Notification) -> Result<(), HandlerError> {
        match self {
            Self::Log => {
                tracing::info!(to = %notification.to, subject = %notification.subject, "notification");
                Ok(())
            }
            Self::File(path) => {
                let mut line = serde_json::to_vec(notification)
                    .map_err(|e| HandlerError::Permanent(e.to_string()))?;
                line.push(b'\n');
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    tokio::fs::create_dir_all(dir)
                        .await
                        .map_err(|e| HandlerError::Transient(format!("{}: {e}", dir.display())))?;
                }
                let mut file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|e| HandlerError::Transient(format!("{}: {e}", path.display())))?;
                file.write_all(&line)
                    .await
                    .map_err(|e| HandlerError::Transient(format!("{}: {e}", path.display())))
            }
            Self::Smtp { transport, from } => {
                let to = notification.to.parse().map_err(|e| {
                    HandlerError::Permanent(format!("recipient `{}`: {e}", notification.to))
                })?;
                let message = Message::builder()
                    .from(from.clone())
                    .to(to)
                    .subject(&notification.subject)
                    .message_id(Some(format!("<{}@courier>", notification.message_id)))
                    .body(notification.body.clone())
                    .map_err(|e| HandlerError::Permanent(e.to_string()))?;
                transport.send(message).await.map(drop).map_err(|e| {
                    if e.is_permanent() {
                        HandlerError::Permanent(format!("smtp: {e}"))
                    } else {
                        HandlerError::Transient(format!("smtp: {e}"))
                    }
                })
            }
        }
    }
}

pub struct NotificationHandler {
    db: DbPool,
    sender: Sender,
}

impl NotificationHandler {
    pub fn new(db: DbPool, sender: Sender) -> Self {
        Self { db, sender }
    }
}

impl Handler for NotificationHandler {
    fn name(&self) -> &str {
        NAME
    }

    /// Sends each notification on its own, then records the sent ones in the
    /// inbox with one statement.
    async fn handle_batch(&self, batch: &[Work<'_>], deadline: Duration) -> Outcomes {
        let sent = join_all(batch.iter().map(|work| async move {
            let notification = notification_for(work)?;
            within(deadline, self.sender.send(&notification)).await
        }))
        .await;
        let sent_ids: Vec<Uuid> = batch
            .iter()
            .zip(&sent)
            .filter(|(_, result)| result.is_ok())
            .map(|(work, _)| work.message_id)
            .collect();
        let recorded = match self.db.get().await {
            Ok(mut conn) => inbox::record_many(&mut conn, NAME, &sent_ids)
                .await
                .map_err(StoreError::classify),
            Err(e) => Err(e.into()),
        };
        batch
            .iter()
            .zip(sent)
            .map(|(work, result)| {
                result?;
                match &recorded {
                    Ok(new) if new.contains(&work.message_id) => Ok(Handled::Done),
                    Ok(_) => Ok(Handled::AlreadyProcessed),
                    Err(error) => Err(HandlerError::from(error)),
                }
            })
            .collect()
    }
}

fn notification_for(work: &Work<'_>) -> Result<Notification, HandlerError> {
    let IncomingEvent::OrderCanceled(canceled) = work.event else {
        return Err(HandlerError::unexpected(NAME, work.event));
    };
    Ok(Notification {
        message_id: work.message_id,
        to: canceled.customer_email.as_str().to_owned(),
        subject: format!("Your order {} was canceled", canceled.order_id),
        body: format!(
            "Your order {} was canceled. {}.{:02} will be refunded to your payment {}.",
            canceled.order_id,
            canceled.amount_cents.cents() / 100,
            canceled.amount_cents.cents() % 100,
            canceled.payment_id.as_str()
        ),
    })
}
