//! What each consumer does with an event, apart from the consume loop:
//! refunds and notifications. A handler makes its effect and records the
//! message id in the inbox in the same transaction, and reports an explicit
//! outcome.

pub mod notification;
pub mod refund;

use std::time::Duration;

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

impl From<&StoreError> for HandlerError {
    fn from(error: &StoreError) -> Self {
        match error {
            StoreError::Unavailable(message) => Self::Unavailable(message.clone()),
            StoreError::Query(e) => Self::Transient(format!("database error: {e}")),
        }
    }
}

impl From<StoreError> for HandlerError {
    fn from(error: StoreError) -> Self {
        Self::from(&error)
    }
}

/// One decoded delivery, as a handler sees it.
#[derive(Debug, Clone, Copy)]
pub struct Work<'a> {
    pub message_id: Uuid,
    pub event: &'a IncomingEvent,
}

/// One outcome per item of a batch, in the batch's order.
pub type Outcomes = Vec<Result<Handled, HandlerError>>;

/// One consumer's logic. `name` is its inbox key and its queue's name.
///
/// A handler takes a batch: it reads what the batch needs in one go, makes
/// each item's external effect on its own (an item slower than `deadline`
/// fails alone, as transient), and records the effects and their inbox rows
/// in one transaction (DESIGN §10). The batch never holds two deliveries with
/// the same message id; the consume loop splits those.
pub trait Handler: Send + Sync + 'static {
    fn name(&self) -> &str;

    fn handle_batch(
        &self,
        batch: &[Work<'_>],
        deadline: Duration,
    ) -> impl Future<Output = Outcomes> + Send;
}

/// An external call that gives up at `deadline`, as a transient failure, so
/// one slow call never holds its batch.
pub async fn within<T>(
    deadline: Duration,
    call: impl Future<Output = Result<T, HandlerError>>,
) -> Result<T, HandlerError> {
    tokio::time::timeout(deadline, call)
        .await
        .unwrap_or_else(|_| {
            Err(HandlerError::Transient(format!(
                "handler did not finish within {deadline:?}"
            )))
        })
}

/// The batch's outcomes, with `missing` for any item left without one.
pub fn fill(
    outcomes: Vec<Option<Result<Handled, HandlerError>>>,
    missing: impl Fn() -> Result<Handled, HandlerError>,
) -> Outcomes {
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(&missing))
        .collect()
}
