//! Broker connections: one place that opens them, names them (the management
//! UI shows which binary holds which connection) and hands them out through a
//! deadpool pool, which drops a connection once it is no longer connected.

use deadpool_lapin::{Config, Runtime};
use lapin::{ConnectionProperties, types::LongString};

use crate::config::{AmqpSettings, BrokerUser};

pub type BrokerPool = deadpool_lapin::Pool;

/// Builds a lazily connecting pool of up to four connections that logs in as
/// `who`; `name` shows up as the connection name.
pub fn broker_pool(
    settings: &AmqpSettings,
    who: &BrokerUser,
    name: &str,
) -> anyhow::Result<BrokerPool> {
    broker_pool_sized(settings, who, name, 4)
}

/// [`broker_pool`] with room for `size` connections: a worker holds one for
/// its whole consume session, so a process needs at least one per worker.
pub fn broker_pool_sized(
    settings: &AmqpSettings,
    who: &BrokerUser,
    name: &str,
    size: usize,
) -> anyhow::Result<BrokerPool> {
    let name: LongString = name.to_owned().into();
    let config = Config {
        url: Some(settings.uri_as(who)),
        pool: Some(deadpool_lapin::PoolConfig::new(size.max(1))),
    };
    config
        .create_pool(
            move || ConnectionProperties::default().with_connection_name(name.clone()),
            Runtime::Tokio1,
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot build the broker pool for {}: {e}",
                settings.display_addr_as(who)
            )
        })
}

/// One connection as the operator user (`amqp.operator`), named `name` in
/// the management UI: for the operator's tools, which need no pool.
pub async fn connect_as_operator(
    settings: &AmqpSettings,
    name: &str,
) -> anyhow::Result<lapin::Connection> {
    lapin::Connection::connect(
        &settings.uri_as(&settings.operator),
        ConnectionProperties::default().with_connection_name(name.to_owned().into()),
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to {}: {e}",
            settings.display_addr_as(&settings.operator)
        )
    })
}

/// The broker's own words when it refused a login or an operation for lack
/// of permission (403 ACCESS_REFUSED, on the connection or a channel). No
/// reconnect fixes that: it is a configuration error, never an outage.
pub fn access_refused(error: &dyn std::fmt::Display) -> Option<String> {
    let text = error.to_string();
    text.find("ACCESS_REFUSED").map(|at| text[at..].to_owned())
}
