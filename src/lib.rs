//! courier: a reliable messaging pipeline on RabbitMQ and PostgreSQL.
//!
//! Crate map:
//! - [`domain`]: pure order rules and the events they raise; no IO, no Diesel, lapin or tokio.
//! - [`check`]: the ground-truth checker of a run (lost, doubled, stuck).
//! - [`config`]: layered settings, validated once at start.
//! - [`store`]: Diesel (async) access to PostgreSQL: pool, migrations, one file per table.
//! - [`amqp`]: broker connection, topology, confirmed publisher, envelope <-> AMQP properties.
//! - [`outbox`]: the relay that moves committed events from the outbox to the broker.
//! - [`consume`]: the consume loop: decode, inbox, outcome -> ack / retry tier / dead letter.
//! - [`handlers`]: refund and notification handlers: their decisions and effects.
//! - [`gateway`]: the payment gateway client and the simulator's server.
//! - [`http`]: the order service's HTTP API.
//! - [`faults`]: test-only crash points, inert unless `COURIER_CRASH_AT` is set.
//! - [`app`]: `run_until_stopped` for each binary; binaries only load config and call these.
//! - [`demo`]: the README's demo workload and its summary.
//! - [`bench`]: the benchmark of issue 7 (broker and database ceilings, the pipeline, the Celery peer).

pub mod amqp;
pub mod app;
pub mod bench;
pub mod check;
pub mod config;
pub mod consume;
pub mod demo;
pub mod domain;
pub mod faults;
pub mod gateway;
pub mod handlers;
pub mod http;
pub mod observe;
pub mod operate;
pub mod outbox;
pub mod shutdown;
pub mod store;
pub mod telemetry;
