//! courier's integration tests: one binary, real RabbitMQ and PostgreSQL,
//! each test in its own vhost and database (see `helpers`). Test names state
//! the promise they prove; DESIGN.md §1 maps promises to tests.

mod batching;
mod bench;
mod cancel_batching;
mod consumer;
mod demo;
mod events;
mod faults;
mod helpers;
mod http;
mod money;
mod observe;
mod operate;
mod orders;
mod prepared;
mod privilege;
mod query_plans;
mod refund_status;
mod relay;
mod relay_handoff;
mod shipping;
mod startup;
mod statements;
mod support;
