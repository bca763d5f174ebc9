//! What the operator CLI (`courier dlq`, `courier outbox status`,
//! `courier topology check`, `courier check`'s queue counts) does, as a
//! library: the binary only parses arguments and prints.

pub mod commands;
pub mod dlq;
pub mod queues;
pub mod render;
