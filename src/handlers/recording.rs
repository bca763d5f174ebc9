//! Handlers whose whole effect is one database write per batch, with the
//! inbox rows in the same transaction: no external call, so no deadline to
//! keep and nothing to do per item but turn it into a row. A consumer of that
//! kind says what it takes from a delivery, how a batch is written and what
//! each written item means ([`Recording`]); [`RecordingHandler`] does the rest.

use std::{marker::PhantomData, time::Duration};

use diesel_async::AsyncPgConnection;

use super::{Handled, Handler, HandlerError, Outcomes, Work, fill};
use crate::store::{DbPool, StoreError};

/// A consumer that only records.
pub trait Recording: Send + Sync + 'static {
    /// The worker's name: its queue's and its inbox's.
    const NAME: &'static str;
    /// What one delivery becomes.
    type Item: Send + Sync;
    /// What writing one item did.
    type Recorded: Send;

    /// The item a delivery stands for, or why it cannot be recorded.
    fn item_of(work: &Work<'_>) -> Result<Self::Item, HandlerError>;

    /// Writes `items` and their inbox rows in one transaction: one result
    /// per item, in order.
    fn record<'c>(
        conn: &'c mut AsyncPgConnection,
        items: &'c [Self::Item],
    ) -> impl Future<Output = Result<Vec<Self::Recorded>, StoreError>> + Send + 'c;

    /// The delivery's outcome, from its item's record.
    fn outcome_of(item: &Self::Item, recorded: Self::Recorded) -> Result<Handled, HandlerError>;
}

/// The [`Handler`] of a [`Recording`] consumer.
pub struct RecordingHandler<R> {
    db: DbPool,
    recording: PhantomData<fn() -> R>,
}

impl<R> RecordingHandler<R> {
    pub fn new(db: DbPool) -> Self {
        Self {
            db,
            recording: PhantomData,
        }
    }
}

impl<R: Recording> Handler for RecordingHandler<R> {
    fn name(&self) -> &str {
        R::NAME
    }

    async fn handle_batch(&self, batch: &[Work<'_>], _deadline: Duration) -> Outcomes {
        let mut outcomes: Vec<Option<Result<Handled, HandlerError>>> =
            batch.iter().map(|_| None).collect();
        let mut items = Vec::with_capacity(batch.len());
        let mut positions = Vec::with_capacity(batch.len());
        for (i, work) in batch.iter().enumerate() {
            match R::item_of(work) {
                Ok(item) => {
                    items.push(item);
                    positions.push(i);
                }
                Err(refused) => outcomes[i] = Some(Err(refused)),
            }
        }
        let recorded = record_batch::<R>(&self.db, &items).await;
        for ((i, item), recorded) in positions.into_iter().zip(&items).zip(recorded) {
            outcomes[i] = Some(
                recorded
                    .map_err(HandlerError::from)
                    .and_then(|r| R::outcome_of(item, r)),
            );
        }
        fill(outcomes, || {
            Err(HandlerError::Transient("no outcome recorded".to_owned()))
        })
    }
}

/// Records `items` in one commit; if that commit fails for a reason other
/// than the connection, records each item again on its own, so one bad item
/// fails alone and its neighbours are still recorded (DESIGN §10).
async fn record_batch<R: Recording>(
    db: &DbPool,
    items: &[R::Item],
) -> Vec<Result<R::Recorded, StoreError>> {
    if items.is_empty() {
        return Vec::new();
    }
    let batch = match db.get().await {
        Ok(mut conn) => R::record(&mut conn, items).await,
        Err(e) => Err(e.into()),
    };
    match batch {
        Ok(recorded) => recorded.into_iter().map(Ok).collect(),
        Err(StoreError::Query(error)) if items.len() > 1 => {
            tracing::warn!(worker = R::NAME, %error, "batch commit failed; recording its items one by one");
            let mut each = Vec::with_capacity(items.len());
            for item in items {
                let one = match db.get().await {
                    Ok(mut conn) => R::record(&mut conn, std::slice::from_ref(item)).await,
                    Err(e) => Err(e.into()),
                };
                each.push(one.and_then(|mut recorded| {
                    recorded.pop().ok_or_else(|| {
                        StoreError::Query(diesel::result::Error::QueryBuilderError(
                            "recording one item returned no outcome".into(),
                        ))
                    })
                }));
            }
            each
        }
        Err(StoreError::Unavailable(message)) => items
            .iter()
            .map(|_| Err(StoreError::Unavailable(message.clone())))
            .collect(),
        // One item: its own failure.
        Err(error) => vec![Err(error)],
    }
}
