//! Moving a queue declared with legacy arguments (settings courier now keeps
//! in policies) to the plan's arguments, without losing a message.
//!
//! RabbitMQ cannot change a live queue's arguments, so the queue must be
//! deleted and declared again, and quorum queues refuse `queue.delete` with
//! `if-empty` (NOT_IMPLEMENTED, which closes the connection). So emptiness is
//! made to hold while it is checked:
//! 1. a classic holding queue `<queue>.migrating` takes over the queue's
//!    bindings, so what is published meanwhile lands there;
//! 2. the queue is migrated only if it holds nothing and nobody consumes it,
//!    and the queues that dead-letter into it (a work queue's delay tiers, a
//!    dead-letter queue's work queue) are empty and unconsumed, so nothing
//!    can reach it by dead-lettering either;
//! 3. the holding queue's messages are moved into the queue (confirmed
//!    before each is acked) and it is deleted with `if-empty`, which classic
//!    queues honour.
//!
//! A queue that fails the check keeps its arguments and its messages, and
//! gets its bindings back; the caller reports it with what to do.

use std::time::Duration;

use anyhow::Context;
use lapin::{
    Channel, Connection,
    options::{
        BasicAckOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};

use super::{
    ConfirmedPublisher,
    plan::{BindingSpec, TopologyPlan},
    topology::passive_queue,
};

const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// What became of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Migration {
    Migrated,
    /// Left as it is, and why.
    Left {
        messages: u32,
        reason: String,
    },
}

/// The holding queue's name while `queue` is migrated.
pub fn holding_queue(queue: &str) -> String {
    format!("{queue}.migrating")
}

/// Migrates `queue` if nothing can be lost doing it; see the module docs.
pub async fn migrate(
    connection: &Connection,
    plan: &TopologyPlan,
    queue: &str,
) -> anyhow::Result<Migration> {
    let channel = connection.create_channel().await?;
    let holding = holding_queue(queue);
    let bindings: Vec<&BindingSpec> = plan.bindings.iter().filter(|b| b.queue == queue).collect();
    channel
        .queue_declare(
            holding.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring the holding queue `{holding}`"))?;
    rebind(&channel, &bindings, &holding, queue).await?;

    let (messages, consumers) = count(&channel, queue).await?;
    let mut blocked = None;
    if messages > 0 {
        blocked = Some(format!("it holds {messages} message(s)"));
    } else if consumers > 0 {
        blocked = Some(format!("{consumers} consumer(s) are attached (stop them)"));
    } else {
        for feeder in feeders(plan, queue) {
            let (messages, consumers) = count(&channel, &feeder).await?;
            if messages > 0 || consumers > 0 {
                blocked = Some(format!(
                    "`{feeder}`, which dead-letters into it, holds {messages} message(s) and has {consumers} consumer(s)"
                ));
                break;
            }
        }
    }
    let outcome = match blocked {
        Some(reason) => {
            rebind(&channel, &bindings, queue, &holding).await?;
            Migration::Left { messages, reason }
        }
        None => {
            channel
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await
                .with_context(|| format!("deleting the empty queue `{queue}`"))?;
            if let Some(spec) = plan.queue_spec(queue) {
                spec.declare(&channel)
                    .await
                    .with_context(|| format!("declaring `{queue}` again"))?;
            }
            rebind(&channel, &bindings, queue, &holding).await?;
            Migration::Migrated
        }
    };
    drain_holding(connection, &channel, &holding, queue).await?;
    let _ = channel.close(200, "migrated".into()).await;
    Ok(outcome)
}

/// The queues whose policy dead-letters into `queue`.
fn feeders(plan: &TopologyPlan, queue: &str) -> Vec<String> {
    plan.policies
        .iter()
        .filter(|p| {
            p.definition
                .get("dead-letter-routing-key")
                .and_then(|v| v.as_str())
                == Some(queue)
        })
        .map(|p| p.queue.clone())
        .collect()
}

async fn count(channel: &Channel, queue: &str) -> anyhow::Result<(u32, u32)> {
    let declared = passive_queue(channel, queue)
        .await
        .with_context(|| format!("counting `{queue}`"))?;
    Ok((declared.message_count(), declared.consumer_count()))
}

/// Binds `to` with every binding of `bindings`, then unbinds `from`: for a
/// moment both receive, never neither.
async fn rebind(
    channel: &Channel,
    bindings: &[&BindingSpec],
    to: &str,
    from: &str,
) -> anyhow::Result<()> {
    for binding in bindings {
        channel
            .queue_bind(
                to.into(),
                binding.exchange.as_str().into(),
                binding.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    for binding in bindings {
        channel
            .queue_unbind(
                from.into(),
                binding.exchange.as_str().into(),
                binding.routing_key.as_str().into(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Moves everything in `holding` into `queue` (confirmed, then acked) and
/// deletes `holding` once it is empty.
async fn drain_holding(
    connection: &Connection,
    channel: &Channel,
    holding: &str,
    queue: &str,
) -> anyhow::Result<()> {
    let publisher = ConfirmedPublisher::open(connection).await?;
    for _ in 0..10 {
        while let Some(message) = channel
            .basic_get(holding.into(), BasicGetOptions { no_ack: false })
            .await?
        {
            publisher
                .publish(
                    "",
                    queue,
                    &message.delivery.data,
                    message.delivery.properties.clone(),
                    CONFIRM_TIMEOUT,
                )
                .await
                .with_context(|| format!("moving a message from `{holding}` into `{queue}`"))?;
            channel
                .basic_ack(message.delivery.delivery_tag, BasicAckOptions::default())
                .await?;
        }
        let deleted = channel
            .queue_delete(
                holding.into(),
                QueueDeleteOptions {
                    if_empty: true,
                    ..QueueDeleteOptions::default()
                },
            )
            .await;
        if deleted.is_ok() {
            let _ = publisher.channel().close(200, "moved".into()).await;
            return Ok(());
        }
    }
    anyhow::bail!(
        "the holding queue `{holding}` kept receiving messages; it is left for `courier topology apply` to drain"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_is_fed_by_the_queues_that_dead_letter_into_it() {
        let plan = crate::amqp::topology::example(&["refunds"], 2).plan();
        assert_eq!(
            feeders(&plan, "refunds"),
            vec!["refunds.retry.1s", "refunds.retry.2s"]
        );
        assert_eq!(feeders(&plan, "refunds.dead"), vec!["refunds"]);
        assert!(feeders(&plan, "refunds.retry.1s").is_empty());
    }
}
