//! What each consumer does with an event, apart from the consume loop:
//! refunds, notifications, the shipping read model and the order service's
//! refund status. A handler makes its effect and records the message id in
//! the inbox in the same transaction, and reports an explicit outcome.
//! Which handler serves which queue is the registry's ([`crate::registry`]).

pub mod notification;
pub mod recording;
pub mod refund;
pub mod refund_status;
pub mod shipping_sync;

use std::{pin::Pin, time::Duration};

use uuid::Uuid;

use crate::{
    config::Settings,
    domain::IncomingEvent,
    store::{DbPool, StoreError},
};

/// A handler's success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    Done,
    /// The inbox already held this message id: no effect was made again.
    AlreadyProcessed,
    /// Nothing to change: what the message says is already superseded (an
    /// older version than the one applied). Recorded in the inbox.
    Skipped,
}

/// A handler's failure, by what the consume loop should do about it.
#[derive(Debug, Clone, thiserror::Error)]
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

impl HandlerError {
    /// An event of a type this handler does not take: its queue is not bound
    /// for it, so it was put there by hand. Permanent.
    pub fn unexpected(handler: &str, event: &IncomingEvent) -> Self {
        Self::Permanent(format!(
            "`{handler}` does not handle `{}` events",
            event.event_type()
        ))
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

/// Why a delivery is about to be shelved in its dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shelved<'a> {
    /// The handler said it can never succeed.
    Permanent { error: &'a str },
    /// It failed transiently on every try, the last tier's included.
    Exhausted { attempts: i64, error: &'a str },
}

/// One consumer's logic. `name` is its inbox key and its queue's name.
///
/// A handler takes a batch: it reads what the batch needs in one go, makes
/// each item's external effect on its own (an item slower than `deadline`
/// fails alone, as transient), and records the effects and their inbox rows
/// in one transaction (DESIGN §10). The batch never holds two deliveries with
/// the same message id; the consume loop splits those.
pub trait Handler: Send + Sync + 'static {
    fn name(&self) -> &str;

    /// True when the handler's own first query already tells a processed
    /// message apart (and answers [`Handled::AlreadyProcessed`] without any
    /// effect), so the worker skips its inbox query before the batch. False
    /// by default: the worker checks the inbox first.
    fn checks_inbox_itself(&self) -> bool {
        false
    }

    fn handle_batch(
        &self,
        batch: &[Work<'_>],
        deadline: Duration,
    ) -> impl Future<Output = Outcomes> + Send;

    /// Runs before a delivery that failed for good is shelved, and before it
    /// is acked: what it stores is durable before the message leaves the
    /// work queue. An error hands the delivery back instead (it comes again
    /// and is shelved then). Nothing by default.
    fn before_dead_letter(
        &self,
        work: Work<'_>,
        shelved: Shelved<'_>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = (work, shelved);
        async { Ok(()) }
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`Handler`] with its futures boxed, so that different handlers can stand
/// behind one type (the registry builds them all alike).
trait ObjectHandler: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn checks_inbox_itself(&self) -> bool;
    fn handle_batch<'a, 'w: 'a>(
        &'a self,
        batch: &'a [Work<'w>],
        deadline: Duration,
    ) -> BoxFuture<'a, Outcomes>;
    fn before_dead_letter<'a>(
        &'a self,
        work: Work<'a>,
        shelved: Shelved<'a>,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

impl<H: Handler> ObjectHandler for H {
    fn name(&self) -> &str {
        Handler::name(self)
    }

    fn checks_inbox_itself(&self) -> bool {
        Handler::checks_inbox_itself(self)
    }

    fn handle_batch<'a, 'w: 'a>(
        &'a self,
        batch: &'a [Work<'w>],
        deadline: Duration,
    ) -> BoxFuture<'a, Outcomes> {
        Box::pin(Handler::handle_batch(self, batch, deadline))
    }

    fn before_dead_letter<'a>(
        &'a self,
        work: Work<'a>,
        shelved: Shelved<'a>,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(Handler::before_dead_letter(self, work, shelved))
    }
}

/// Any handler, behind one type: what the registry builds and the consume
/// loop runs. One allocation per batch, next to a database commit.
pub struct BoxedHandler(Box<dyn ObjectHandler>);

impl BoxedHandler {
    pub fn new(handler: impl Handler) -> Self {
        Self(Box::new(handler))
    }
}

impl Handler for BoxedHandler {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn checks_inbox_itself(&self) -> bool {
        self.0.checks_inbox_itself()
    }

    async fn handle_batch(&self, batch: &[Work<'_>], deadline: Duration) -> Outcomes {
        self.0.handle_batch(batch, deadline).await
    }

    async fn before_dead_letter(
        &self,
        work: Work<'_>,
        shelved: Shelved<'_>,
    ) -> Result<(), HandlerError> {
        self.0.before_dead_letter(work, shelved).await
    }
}

/// What a handler may be built from.
pub struct HandlerDeps<'a> {
    pub db: &'a DbPool,
    pub settings: &'a Settings,
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
