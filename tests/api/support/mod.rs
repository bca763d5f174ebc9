//! Test support for destructive faults: a TCP proxy that blackholes, resets,
//! cuts and slows connections, and throwaway RabbitMQ and PostgreSQL servers
//! (own ports, own data directories) that tests may kill and restart. The
//! machine's shared services are never touched from here.
//!
//! Every helper cleans up in `Drop` (processes killed, directories removed),
//! also when the test panicked.

// A toolbox: not every test uses every tool.
#![allow(dead_code)]

pub mod broker_node;
pub mod pg_cluster;
pub mod proxy;
mod sys;

// The names other test modules import (`use crate::support::PgCluster;`).
#[allow(unused_imports)]
pub use broker_node::BrokerNode;
#[allow(unused_imports)]
pub use pg_cluster::PgCluster;
#[allow(unused_imports)]
pub use proxy::TcpProxy;
#[allow(unused_imports)]
pub use sys::{append_log, free_port};

/// Stops and removes the throwaway servers of test processes that died
/// without running their destructors (SIGKILL, Ctrl-C, a CI timeout); each
/// server start calls it first.
fn sweep_orphans() {
    sys::sweep_orphans(broker_node::is_broker_dir, broker_node::stop_orphan);
    sys::sweep_orphans(pg_cluster::is_cluster_dir, pg_cluster::stop_orphan);
}
