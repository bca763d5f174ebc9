//! Provisioning a broker for courier, the operator's one step before the
//! services start: the vhost, one user per service with the narrowest grant
//! that works ([`Permissions`]), the operator user, then the topology,
//! declared as the operator, with each queue's policy. Safe to run again.
//!
//! The topology is declared here rather than by each service at start: a
//! user who may declare a queue may also delete it (both are `configure`),
//! and declaring a work queue that dead-letters anywhere needs write on the
//! dead-letter exchange. Services only check, passively, that what they use
//! exists.

use std::collections::HashSet;

use anyhow::Context;
use lapin::{
    Connection, ConnectionProperties,
    options::{QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};

use super::{Topology, management::Management, permissions::Permissions};
use crate::config::AmqpSettings;

/// The operator's tags: the management UI and API, and (policymaker) the
/// vhost's policies and runtime parameters, which `courier topology apply`
/// and the UI's "Move messages" (a dynamic shovel) need. Not administration.
pub const OPERATOR_TAGS: &str = "management,policymaker";

pub async fn provision(
    admin: &Management,
    amqp: &AmqpSettings,
    topology: &Topology,
) -> anyhow::Result<ApplyReport> {
    admin.ensure_vhost(&amqp.vhost).await?;
    let grants = [
        (&amqp.producer, "", Permissions::producer(topology)),
        (&amqp.consumer, "", Permissions::consumer(topology)),
        (&amqp.operator, OPERATOR_TAGS, Permissions::operator()),
    ];
    for (user, tags, grant) in &grants {
        admin.put_user(user, tags).await?;
        admin
            .set_permissions(&amqp.vhost, &user.user, grant)
            .await?;
        tracing::info!(user = %user.user, vhost = %amqp.vhost, configure = %grant.configure, write = %grant.write, read = %grant.read, "broker user granted");
    }
    declare_topology(amqp, topology).await
}

/// What `declare_topology` did about queues declared with other arguments
/// than the plan's (before courier moved settings into policies).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ApplyReport {
    /// Empty queues that were deleted and declared again with the plan's arguments.
    pub migrated: Vec<String>,
    /// Queues left as they are because they hold messages.
    pub left: Vec<LeftQueue>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LeftQueue {
    pub queue: String,
    pub messages: u32,
    /// The arguments that differ from the plan's, `key = value`.
    pub arguments: Vec<String>,
}

impl std::fmt::Display for LeftQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "queue `{}` holds {} message(s) and was declared with {}: left as it is (courier never deletes a queue with messages in it). \
             Drain it (a work queue: let the consumer run; a delay tier: wait for its delay; a dead-letter queue: `courier dlq replay`, \
             or the management UI's Move messages into a temporary queue and back afterwards), then run `courier topology apply` again. \
             Until then its policy applies only where an argument does not win.",
            self.queue,
            self.messages,
            self.arguments.join(", ")
        )
    }
}

/// Declares the whole topology as the operator user and applies each queue's
/// policy through the management API (policies are not AMQP).
///
/// A queue that exists with other arguments than the plan's (the changeable
/// settings used to be `x-` arguments, and an argument wins over a policy)
/// is migrated when it is empty: deleted with `if-empty`, which the broker
/// refuses atomically if a message arrived meanwhile, and declared again at
/// once. A queue with messages is never deleted; it is reported in
/// [`ApplyReport::left`] with what to do, and `courier topology check` keeps
/// naming its legacy arguments. Events published in the instant a work queue
/// is re-declared go to the alternate exchange's queue, never nowhere.
pub async fn declare_topology(
    amqp: &AmqpSettings,
    topology: &Topology,
) -> anyhow::Result<ApplyReport> {
    let who = amqp.display_addr_as(&amqp.operator);
    let management = Management::as_operator(amqp)?;
    let plan = topology.plan();
    let live = management.live_topology(&amqp.vhost).await?;
    let connection = Connection::connect(
        &amqp.uri_as(&amqp.operator),
        ConnectionProperties::default().with_connection_name("courier-operator".into()),
    )
    .await
    .with_context(|| format!("cannot connect to {who}"))?;
    let mut report = ApplyReport::default();
    let mut skip = HashSet::new();
    for spec in &plan.queues {
        let Some(found) = live.queues.iter().find(|q| q.name == spec.name) else {
            continue;
        };
        if found.arguments == spec.arguments {
            continue;
        }
        let channel = connection.create_channel().await?;
        let deleted = channel
            .queue_delete(
                spec.name.as_str().into(),
                QueueDeleteOptions {
                    if_empty: true,
                    ..QueueDeleteOptions::default()
                },
            )
            .await;
        match deleted {
            Ok(_) => {
                tracing::info!(queue = %spec.name, "empty queue with legacy arguments deleted; declaring it again");
                report.migrated.push(spec.name.clone());
            }
            Err(error) => {
                // The refusal closed that channel; count on a fresh one.
                let channel = connection.create_channel().await?;
                let messages = channel
                    .queue_declare(
                        spec.name.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map(|q| q.message_count())
                    .with_context(|| format!("queue `{}` refused deletion ({error})", spec.name))?;
                let _ = channel.close(200, "counted".into()).await;
                skip.insert(spec.name.clone());
                report.left.push(LeftQueue {
                    queue: spec.name.clone(),
                    messages,
                    arguments: found
                        .arguments
                        .iter()
                        .filter(|(k, v)| spec.arguments.get(*k) != Some(*v))
                        .map(|(k, v)| format!("{k} = {v}"))
                        .collect(),
                });
            }
        }
    }
    let channel = connection.create_channel().await?;
    plan.declare(&channel, &skip)
        .await
        .with_context(|| format!("declaring the topology as {who}"))?;
    for policy in &plan.policies {
        management
            .put_policy(&amqp.vhost, policy)
            .await
            .with_context(|| format!("applying policy `{}` as {who}", policy.name))?;
    }
    let _ = connection.close(200, "topology declared".into()).await;
    Ok(report)
}
