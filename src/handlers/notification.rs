//! The notification handler: tells the customer their order was canceled,
//! through a pluggable sender, then records the message ids of a batch in the
//! inbox with one statement.
//!
//! A crash between sending and recording means the customer may get the
//! message twice; an e-mail cannot share a transaction with our database, and
//! we prefer a duplicate e-mail to a lost one.

use std::{io::Write, path::PathBuf, time::Duration};

use futures_util::future::join_all;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Serialize;
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
                let line = json_line(notification)?;
                append_lines(path.clone(), line).await
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

    /// Sends a batch: one result per notification, in order. The file
    /// sender appends the whole batch with one write, where sending one by
    /// one would cost each notification its own trips to the blocking pool
    /// (create the directory, open, write); the others send each on its own.
    pub async fn send_all(
        &self,
        notifications: &[Result<Notification, HandlerError>],
        deadline: Duration,
    ) -> Vec<Result<(), HandlerError>> {
        let Self::File(path) = self else {
            return join_all(notifications.iter().map(|n| async move {
                match n {
                    Ok(notification) => within(deadline, self.send(notification)).await,
                    Err(error) => Err(error.clone()),
                }
            }))
            .await;
        };
        let lines: Vec<Result<Vec<u8>, HandlerError>> = notifications
            .iter()
            .map(|n| n.as_ref().map_err(Clone::clone).and_then(json_line))
            .collect();
        let batch: Vec<u8> = lines.iter().flatten().flatten().copied().collect();
        let written = if batch.is_empty() {
            Ok(())
        } else {
            within(deadline, append_lines(path.clone(), batch)).await
        };
        lines
            .into_iter()
            .map(|line| line.and_then(|_| written.clone()))
            .collect()
    }
}

fn json_line(notification: &Notification) -> Result<Vec<u8>, HandlerError> {
    let mut line =
        serde_json::to_vec(notification).map_err(|e| HandlerError::Permanent(e.to_string()))?;
    line.push(b'\n');
    Ok(line)
}

/// Appends `lines` to the file at `path` with one write, creating the file
/// and its directory when missing; on the blocking pool, in one trip.
async fn append_lines(path: PathBuf, lines: Vec<u8>) -> Result<(), HandlerError> {
    tokio::task::spawn_blocking(move || {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| HandlerError::Transient(format!("{}: {e}", dir.display())))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(&lines))
            .map_err(|e| HandlerError::Transient(format!("{}: {e}", path.display())))
    })
    .await
    .map_err(|e| HandlerError::Transient(format!("notification file writer: {e}")))?
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

    /// Sends the batch's notifications (each file line, e-mail or log line its
    /// own outcome), then records the sent ones in the inbox with one statement.
    async fn handle_batch(&self, batch: &[Work<'_>], deadline: Duration) -> Outcomes {
        let notifications: Vec<_> = batch.iter().map(notification_for).collect();
        let sent = self.sender.send_all(&notifications, deadline).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(to: &str) -> Notification {
        Notification {
            message_id: Uuid::now_v7(),
            to: to.to_owned(),
            subject: "Your order was canceled".to_owned(),
            body: "refunded".to_owned(),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("courier-{name}-{}", Uuid::now_v7()))
    }

    #[tokio::test]
    async fn a_batch_of_notifications_is_appended_in_order_each_with_its_own_outcome() {
        let path = scratch("notifications").join("sent.jsonl");
        let sender = Sender::File(path.clone());
        let batch = [
            Ok(notification("a@example.com")),
            Err(HandlerError::Permanent("not a cancellation".to_owned())),
            Ok(notification("b@example.com")),
        ];
        let results = sender.send_all(&batch, Duration::from_secs(5)).await;
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        assert!(
            matches!(&results[1], Err(HandlerError::Permanent(_))),
            "{results:?}"
        );
        let written = std::fs::read_to_string(&path).unwrap_or_default();
        let recipients: Vec<String> = written
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|line| line["to"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(recipients, ["a@example.com", "b@example.com"]);
    }

    #[tokio::test]
    async fn a_notification_file_that_cannot_be_written_fails_the_batch_as_transient() {
        // The notification file's directory is a plain file: nothing can be created in it.
        let blocker = scratch("not-a-directory");
        assert!(std::fs::write(&blocker, b"").is_ok());
        let sender = Sender::File(blocker.join("sent.jsonl"));
        let batch = [
            Ok(notification("a@example.com")),
            Ok(notification("b@example.com")),
        ];
        let results = sender.send_all(&batch, Duration::from_secs(5)).await;
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(HandlerError::Transient(_)))),
            "{results:?}"
        );
    }
}
