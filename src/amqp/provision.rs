//! Provisioning a broker for courier, the operator's one step before the
//! services start: the vhost, one user per service with the narrowest grant
//! that works ([`Permissions`]), the operator user, then the topology,
//! declared as the operator. Safe to run again.
//!
//! The topology is declared here rather than by each service at start: a
//! user who may declare a queue may also delete it (both are `configure`),
//! and declaring a work queue that dead-letters anywhere needs write on the
//! dead-letter exchange. Services only check, passively, that what they use
//! exists.

use anyhow::Context;
use lapin::{Connection, ConnectionProperties};

use super::{Topology, management::Management, permissions::Permissions};
use crate::config::AmqpSettings;

/// The operator's tag: the management UI and API, not broker administration.
pub const OPERATOR_TAGS: &str = "management";

pub async fn provision(
    admin: &Management,
    amqp: &AmqpSettings,
    topology: &Topology,
) -> anyhow::Result<()> {
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

/// Declares the whole topology as the operator user.
pub async fn declare_topology(amqp: &AmqpSettings, topology: &Topology) -> anyhow::Result<()> {
    let who = amqp.display_addr_as(&amqp.operator);
    let connection = Connection::connect(
        &amqp.uri_as(&amqp.operator),
        ConnectionProperties::default().with_connection_name("courier-operator".into()),
    )
    .await
    .with_context(|| format!("cannot connect to {who}"))?;
    let channel = connection.create_channel().await?;
    topology
        .declare(&channel)
        .await
        .with_context(|| format!("declaring the topology as {who}"))?;
    let _ = connection.close(200, "topology declared".into()).await;
    Ok(())
}
