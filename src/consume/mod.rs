//! The consume loop, separate from what the handlers do: decode a delivery,
//! consult the inbox, run the handler, and turn its outcome into an ack, a
//! confirmed copy into a delay tier, or a confirmed copy into the dead-letter
//! queue — always in that order, so a delivery is acked only once its
//! outcome is durable (P3).

pub mod decision;
pub mod decode;
pub mod stats;
pub mod worker;

pub use decision::{Decision, decide};
pub use decode::{Decoded, Poison, decode};
pub use stats::{ConsumerStats, WorkerStats};
pub use worker::{Worker, WorkerConfig, WorkerError};
