//! The broker's ceiling for one hop: confirmed publishes of persistent
//! messages shaped like our event (same body, same properties) into a quorum
//! queue, with a window of outstanding confirms, while a consumer with a
//! prefetch window acks them with `multiple` acks; msgs/s from the first
//! publish to the last ack.

use std::time::Duration;

use chrono::Utc;
use futures_util::{StreamExt, stream::FuturesUnordered};
use lapin::{
    Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use tokio::time::Instant;

use crate::{
    amqp::{ConfirmedPublisher, envelope},
    domain::{AmountCents, CustomerEmail, Order, PaymentId},
    store::outbox::OutboxRow,
};

/// How the hop is driven.
#[derive(Debug, Clone, Copy)]
pub struct BrokerLoad {
    pub messages: usize,
    /// Publishes sent but not yet confirmed, at most.
    pub confirm_window: usize,
    pub prefetch: u16,
    /// Ack with `multiple` after this many deliveries (and at the end).
    pub ack_every: usize,
}

/// A stored event exactly as the relay would publish it: body and properties.
pub fn sample_event() -> anyhow::Result<OutboxRow> {
    let now = Utc::now();
    let mut order = Order::place(
        PaymentId::parse("pay-bench-000001")?,
        AmountCents::parse(1999)?,
        CustomerEmail::parse("customer000001@example.org")?,
        None,
        now,
    );
    let record = order.cancel(now)?.to_record()?;
    Ok(OutboxRow {
        id: 1,
        event_id: record.event_id.as_uuid(),
        event_type: record.event_type.to_owned(),
        event_version: record.event_version,
        aggregate_type: record.aggregate_type.to_owned(),
        aggregate_id: record.aggregate_id,
        aggregate_version: record.aggregate_version,
        content_type: "application/json".to_owned(),
        payload: record.payload,
        correlation_id: Some(uuid::Uuid::now_v7().to_string()),
        occurred_at: record.occurred_at,
        published_at: None,
        attempts: 0,
        last_error: None,
        next_attempt_at: now,
    })
}

/// One run: msgs/s for publish-confirmed + consume-acked, concurrently.
pub async fn one_hop(amqp_uri: &str, queue: &str, load: BrokerLoad) -> anyhow::Result<f64> {
    let event = sample_event()?;
    let body = event.payload.to_string().into_bytes();
    let properties = envelope::properties_for(&event, "courier-bench");

    let publishing = Connection::connect(amqp_uri, ConnectionProperties::default()).await?;
    let consuming = Connection::connect(amqp_uri, ConnectionProperties::default()).await?;
    let setup = publishing.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    setup
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    setup.queue_purge(queue.into(), Default::default()).await?;

    let channel = consuming.create_channel().await?;
    channel
        .basic_qos(load.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bench-limit".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let total = load.messages;
    let ack_every = load.ack_every.max(1);
    let consume = tokio::spawn(async move {
        let mut seen = 0usize;
        let mut unacked = 0usize;
        while seen < total {
            let Some(delivery) =
                tokio::time::timeout(Duration::from_secs(60), consumer.next()).await?
            else {
                anyhow::bail!("consumer stream ended after {seen} of {total}");
            };
            let delivery = delivery?;
            seen += 1;
            unacked += 1;
            if unacked >= ack_every || seen == total {
                delivery
                    .acker
                    .ack(BasicAckOptions { multiple: true })
                    .await?;
                unacked = 0;
            }
        }
        anyhow::Ok(())
    });

    let publisher = ConfirmedPublisher::open(&publishing).await?;
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for _ in 0..total {
        while pending.len() >= load.confirm_window.max(1) {
            if let Some(result) = pending.next().await {
                result?;
            }
        }
        let confirm = publisher.send("", queue, &body, properties.clone()).await?;
        pending.push(confirm.settle(Duration::from_secs(30)));
    }
    while let Some(result) = pending.next().await {
        result?;
    }
    consume.await??;
    let elapsed = started.elapsed().as_secs_f64();

    let _ = setup
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = publishing.close(200, "bench done".into()).await;
    let _ = consuming.close(200, "bench done".into()).await;
    Ok(total as f64 / elapsed)
}
