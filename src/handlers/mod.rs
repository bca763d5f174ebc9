//! What each consumer does with an event, apart from the consume loop:
//! refunds and notifications. A handler makes its effect and records the
//! message id in the inbox in the same transaction, and reports an explicit
//! outcome.

pub mod notification;
pub mod refund;

use uuid::Uuid;

use crate::{domain::IncomingEvent, store::StoreError};

/// A handler's success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    Done,
    /// The inbox already held this message id: no effect was made again.
    AlreadyProcessed,
}

/// A handler's failure, by what the consume loop should do about it.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Try again later through the delay tiers.
    #[error("{0}")]
    Transient(String),
    /// Will never succeed: dead-letter at once.
    #[error("{0}")]
    Permanent(String),
    /// Our own database is unreachable: hand the delivery back without
    /// spending a retry, nothing was decided.
    #[error("{0}")]
    Unavailable(String),
}

impl From<StoreError> for HandlerError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(message) => Self::Unavailable(message),
            StoreError::Query(e) => Self::Transient(format!("database error: {e}")),
        }
    }
}

/// One consumer's logic. `name` is its inbox key and its queue's name.
pub trait Handler: Send + Sync + 'static {
    fn name(&self) -> &str;

    fn handle(
        &self,
        message_id: Uuid,
        event: &IncomingEvent,
    ) -> impl Future<Output = Result<Handled, HandlerError>> + Send;
}
