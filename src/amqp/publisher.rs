//! Publishing with publisher confirms: a message counts as taken only when the
//! broker acked it and did not return it (`Ack` carrying a returned message
//! means it was NOT delivered anywhere).

use std::{future::poll_fn, pin::Pin, task::Poll, time::Duration};

use lapin::{
    BasicProperties, Channel, Confirmation, Connection, PublisherConfirm,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};

/// Why a publish did not count.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker nacked the message (a queue refused it, e.g. full with reject-publish)")]
    Nacked,
    #[error("broker returned the message as unroutable: {code} {text}")]
    Returned { code: u16, text: String },
    #[error("no confirm from the broker within {0:?}")]
    Timeout(Duration),
    #[error("channel error: {0}")]
    Channel(#[from] lapin::Error),
}

/// A confirm-mode channel. Cheap to keep; reopen it if [`is_open`] turns false.
///
/// [`is_open`]: ConfirmedPublisher::is_open
#[derive(Debug, Clone)]
pub struct ConfirmedPublisher {
    channel: Channel,
}

/// A publish sent and not yet confirmed; many can be in flight at once.
#[must_use = "a publish counts only once its confirm was awaited"]
pub struct PendingConfirm(PublisherConfirm);

impl ConfirmedPublisher {
    pub async fn open(connection: &Connection) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Sends a persistent `mandatory` publish; await the returned confirm.
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<PendingConfirm, PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                properties,
            )
            .await?;
        Ok(PendingConfirm(confirm))
    }

    /// Sends `messages` (routing key, body, properties) in the order given,
    /// without waiting for one to be written before queueing the next: a
    /// publish takes its delivery tag and queues its frames on its first
    /// poll, and every poll below walks the sends in order, so the broker
    /// receives them in that order. One result per message, in order.
    pub async fn send_all<'a>(
        &self,
        exchange: &str,
        messages: impl IntoIterator<Item = (&'a str, &'a [u8], BasicProperties)>,
    ) -> Vec<Result<PendingConfirm, PublishError>> {
        let mut sends: Vec<Pin<Box<_>>> = messages
            .into_iter()
            .map(|(routing_key, body, properties)| {
                Box::pin(self.send(exchange, routing_key, body, properties))
            })
            .collect();
        let mut results: Vec<Option<Result<PendingConfirm, PublishError>>> =
            sends.iter().map(|_| None).collect();
        poll_fn(|cx| {
            for (send, result) in sends.iter_mut().zip(results.iter_mut()) {
                if result.is_none()
                    && let Poll::Ready(done) = send.as_mut().poll(cx)
                {
                    *result = Some(done);
                }
            }
            if results.iter().all(Option::is_some) {
                Poll::Ready(results.iter_mut().filter_map(Option::take).collect())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Sends and waits for the confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
        timeout: Duration,
    ) -> Result<(), PublishError> {
        self.send(exchange, routing_key, payload, properties)
            .await?
            .settle(timeout)
            .await
    }
}

impl PendingConfirm {
    /// Waits for the broker's answer: `Ok` only for an ack without a return.
    pub async fn settle(self, timeout: Duration) -> Result<(), PublishError> {
        match tokio::time::timeout(timeout, self.0).await {
            Err(_) => Err(PublishError::Timeout(timeout)),
            Ok(Err(error)) => Err(PublishError::Channel(error)),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)))) => {
                Err(PublishError::Returned {
                    code: returned.reply_code,
                    text: returned.reply_text.to_string(),
                })
            }
            Ok(Ok(Confirmation::Nack(None))) => Err(PublishError::Nacked),
            // Only a channel without confirm_select answers this; ours always has it.
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Nacked),
        }
    }
}
