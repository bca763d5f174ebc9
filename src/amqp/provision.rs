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

use super::{
    Topology,
    management::Management,
    migrate::{self, Migration},
    permissions::Permissions,
};
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
    /// Why it could not be migrated now.
    pub reason: String,
    /// The arguments that differ from the plan's, `key = value`.
    pub arguments: Vec<String>,
}

impl std::fmt::Display for LeftQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "queue `{}` was declared with {} and was left as it is: {} (courier never deletes a queue with messages in it or one that could still receive some). \
             Stop the consumer, drain it (a work queue: let the consumer run; a delay tier: wait for its delay; a dead-letter queue: `courier dlq replay`, \
             or the management UI's Move messages into a temporary queue and back afterwards), then run `courier topology apply` again. \
             Until then its policy applies only where an argument does not win.",
            self.queue,
            self.arguments.join(", "),
            self.reason
        )
    }
}

/// Declares the whole topology as the operator user and applies each queue's
/// policy through the management API (policies are not AMQP).
///
/// A queue that exists with other arguments than the plan's (the changeable
/// settings used to be `x-` arguments, and an argument wins over a policy)
/// is migrated when nothing can be lost doing it ([`migrate`]): it is empty,
/// unconsumed, and nothing dead-letters into it; what is published meanwhile
/// waits in a holding queue. Any other such queue is never deleted; it is
/// reported in [`ApplyReport::left`] with what to do, and `courier topology
/// check` keeps naming its legacy arguments.
pub async fn declare_topology(
    amqp: &AmqpSettings,
    topology: &Topology,
) -> anyhow::Result<ApplyReport> {
    let who = amqp.display_addr_as(&amqp.operator);
    let management = Management::as_operator(amqp)?;
    let plan = topology.plan();
    let live = management.live_topology(&amqp.vhost).await?;
    let connection = super::connection::connect_as_operator(amqp, "courier-operator").await?;
    let mut report = ApplyReport::default();
    let mut skip = HashSet::new();
    plan.declare_exchanges(&connection.create_channel().await?)
        .await
        .with_context(|| format!("declaring the exchanges as {who}"))?;
    for spec in &plan.queues {
        let Some(found) = live.queues.iter().find(|q| q.name == spec.name) else {
            continue;
        };
        if found.arguments == spec.arguments {
            continue;
        }
        match migrate::migrate(&connection, &plan, &spec.name).await? {
            Migration::Migrated => {
                tracing::info!(queue = %spec.name, "queue with legacy arguments declared again with the plan's");
                report.migrated.push(spec.name.clone());
            }
            Migration::Left { messages, reason } => {
                skip.insert(spec.name.clone());
                report.left.push(LeftQueue {
                    queue: spec.name.clone(),
                    messages,
                    reason,
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
