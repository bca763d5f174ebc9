//! Everything that speaks AMQP: the connection pool, the topology, the
//! confirmed publisher and the mapping between our envelope and AMQP
//! properties. The rest of the crate sees broker I/O only through here.

pub mod connection;
pub mod drift;
pub mod envelope;
pub mod management;
pub mod migrate;
pub mod permissions;
pub mod plan;
pub mod provision;
pub mod publisher;
pub mod topology;

pub use connection::{BrokerPool, access_refused, broker_pool, broker_pool_sized};
pub use publisher::{ConfirmedPublisher, PublishError};
pub use topology::{Topology, WorkerQueues};
