//! Group commit for cancels. Each `POST /orders/{id}/cancel` hands its
//! request to one gathering task and waits for its own answer; the task
//! writes whatever has arrived as one batch ([`cancel_batch::cancel_many`]:
//! two round trips and one commit for the whole batch). While a batch is
//! being written the next requests gather, so under load batches grow by
//! themselves, and a lone request never waits for company.
//!
//! A request is answered only after its batch committed, exactly as a cancel
//! written on its own: nothing is acknowledged that a crash could lose.

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::faults::{CrashPoint, crash_point};
use crate::outbox::Handoff;
use crate::store::{
    DbPool, StoreError,
    cancel_batch::{self, CancelOutcome, CancelRequest},
    orders::ChangeOrderError,
    retry_once_if_unavailable,
};

/// How cancels are batched (`[producer]` in the configuration).
#[derive(Debug, Clone, Copy)]
pub struct CancelBatching {
    /// The most cancels written in one batch.
    pub max: usize,
    /// Batches written at once.
    pub in_flight: usize,
}

/// The gathering task's mailbox; cloned into every request handler. The task
/// stops when the last clone is dropped.
#[derive(Clone)]
pub struct CancelQueue {
    requests: mpsc::Sender<Pending>,
}

struct Pending {
    request: CancelRequest,
    reply: oneshot::Sender<CancelOutcome>,
}

impl CancelQueue {
    /// Starts the gathering task on the current runtime. Each batch's
    /// events are handed to `relay`, the order events' relay of this
    /// process, when there is one ([`Handoff`]).
    pub fn spawn(db: DbPool, batching: CancelBatching, relay: Option<Arc<Handoff>>) -> Self {
        let max = batching.max.max(1);
        let in_flight = batching.in_flight.max(1);
        // Room for the batches in flight and the next few: beyond that a
        // request waits to be queued, which is the backpressure we want.
        let (requests, inbox) = mpsc::channel(max * (in_flight + 2));
        tokio::spawn(gather(db, relay, inbox, max, in_flight));
        Self { requests }
    }

    /// Cancels handed over and not yet taken into a batch.
    pub fn queued(&self) -> usize {
        self.requests.max_capacity() - self.requests.capacity()
    }

    /// Cancels one order in the next batch and returns its own outcome.
    pub async fn cancel(&self, request: CancelRequest) -> CancelOutcome {
        let (reply, answer) = oneshot::channel();
        if self
            .requests
            .send(Pending { request, reply })
            .await
            .is_err()
        {
            return Err(ChangeOrderError::Store(StoreError::Unavailable(
                "the order service is stopping".to_owned(),
            )));
        }
        answer.await.unwrap_or_else(|_| {
            Err(ChangeOrderError::Store(StoreError::Query(
                diesel::result::Error::QueryBuilderError(
                    "the cancel's batch was abandoned before it answered".into(),
                ),
            )))
        })
    }
}

async fn gather(
    db: DbPool,
    relay: Option<Arc<Handoff>>,
    mut inbox: mpsc::Receiver<Pending>,
    max: usize,
    in_flight: usize,
) {
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = inbox.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match inbox.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        let db = db.clone();
        let relay = relay.clone();
        tokio::spawn(async move {
            write(&db, relay.as_deref(), batch).await;
            drop(slot);
        });
    }
}

async fn write(db: &DbPool, relay: Option<&Handoff>, batch: Vec<Pending>) {
    let (requests, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|p| (p.request, p.reply)).unzip();
    let now = Utc::now();
    let result = retry_once_if_unavailable(db, async |conn| {
        cancel_batch::cancel_many(conn, &requests, now, relay).await
    })
    .await;
    match result {
        Ok(outcomes) => {
            crash_point(CrashPoint::AfterCancelBatchCommit);
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                // A client that went away still had its cancel written.
                let _ = reply.send(outcome);
            }
        }
        Err(error) => {
            tracing::warn!(%error, cancels = replies.len(), "cancel batch failed");
            for reply in replies {
                let _ = reply.send(Err(ChangeOrderError::Store(copy_of(&error))));
            }
        }
    }
}

/// The batch's one error, for each of its requests.
fn copy_of(error: &StoreError) -> StoreError {
    match error {
        StoreError::Unavailable(detail) => StoreError::Unavailable(detail.clone()),
        StoreError::Query(error) => StoreError::Query(diesel::result::Error::QueryBuilderError(
            error.to_string().into(),
        )),
    }
}
