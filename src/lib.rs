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
//! - [`registry`]: one entry per worker (queue, bindings, handler, process); all else reads it.
//! - [`handlers`]: refund, notification, shipping-sync and refund-status handlers.
//! - [`gateway`]: the payment gateway client and the simulator's server.
//! - [`http`]: the order service's HTTP API, its event API included.
//! - [`event_reader`]: a pull reader of the event API with its own offset (the example's).
//! - [`text`]: UTF-8-safe truncation, shared by every floor.
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
pub mod event_reader;
pub mod faults;
pub mod gateway;
pub mod handlers;
pub mod http;
pub mod observe;
pub mod operate;
pub mod outbox;
pub mod registry;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod text;
