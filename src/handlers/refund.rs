//! The refund handler. Money moves once per canceled order and only for what
//! the order service decided (P4, P10):
//! - an order that already has its refund is not refunded again, whatever
//!   message asks: the delivery is recorded as a duplicate and acked;
//! - the event is checked against the order record first (exists, canceled,
//!   same payment, same amount); a mismatch is permanent and dead-lettered;
//! - the gateway's idempotency key is the order's [`RefundKey`], so even two
//!   different messages for one order racing past the first check get the
//!   same refund back from the gateway.
//!
//! A batch of deliveries is checked in one query, each refund is asked of
//! the gateway on its own, and the batch's refunds, their `refund.completed`
//! events and inbox rows then commit in one transaction. If we die between
//! the gateway calls and the commit, the redeliveries call the gateway with
//! the same keys and get the same refunds back: one refund per order.
//!
//! A refund given up on (the gateway refused it for good, or it failed on
//! every retry tier) raises `refund.failed` before its request is shelved,
//! so the order shows why. No inbox row is written for it: the request is
//! parked, not processed, and a replay once the cause is fixed must still
//! refund.

use std::time::Duration;

use chrono::Utc;
use futures_util::future::join_all;
use uuid::Uuid;

use super::{Handled, Handler, HandlerError, Outcomes, Shelved, Work, fill, within};
use crate::{
    domain::{
        EventId, IncomingEvent, OrderCanceled, OrderId, RefundCompleted, RefundFailed, RefundKey,
        authorize_refund,
    },
    faults::{CrashPoint, crash_point},
    gateway::client::{GatewayClient, GatewayError},
    store::{
        DbPool, StoreError, inbox, orders, outbox,
        refunds::{self, NewRefund, Recorded, RefundRow},
    },
};

pub const NAME: &str = "refunds";

pub struct RefundHandler {
    db: DbPool,
    gateway: GatewayClient,
}

/// What the order record says about one item before any money moves.
enum Precheck {
    Refund,
    /// The order has its refund already; this message is recorded as processed.
    AlreadyRefunded,
}

impl RefundHandler {
    pub fn new(db: DbPool, gateway: GatewayClient) -> Self {
        Self { db, gateway }
    }

    /// Reads what we trust (our refunds, the order records) for the whole
    /// batch in one query, on a connection that is given back before the
    /// gateway calls, so a slow gateway does not hold database connections.
    async fn precheck(
        &self,
        events: &[&OrderCanceled],
    ) -> Result<Vec<Result<Precheck, HandlerError>>, StoreError> {
        let ids: Vec<OrderId> = events.iter().map(|e| e.order_id).collect();
        let mut conn = self.db.get().await?;
        let orders = orders::find_many_with_refund(&mut conn, &ids).await?;
        Ok(events
            .iter()
            .map(|canceled| match orders.get(&canceled.order_id) {
                Some((_, true)) => Ok(Precheck::AlreadyRefunded),
                found => authorize_refund(found.map(|(order, _)| order), canceled)
                    .map(|()| Precheck::Refund)
                    .map_err(|refused| HandlerError::Permanent(refused.to_string())),
            })
            .collect())
    }

    async fn refund_at_gateway(
        &self,
        message_id: Uuid,
        canceled: &OrderCanceled,
        deadline: Duration,
    ) -> Result<NewRefund, HandlerError> {
        let receipt = within(deadline, async {
            self.gateway
                .refund(
                    &RefundKey::for_order(canceled.order_id),
                    &canceled.payment_id,
                    canceled.amount_cents,
                )
                .await
                .map_err(|error| match error {
                    GatewayError::Transient(e) => {
                        HandlerError::Transient(format!("payment gateway: {e}"))
                    }
                    GatewayError::Permanent(e) => {
                        HandlerError::Permanent(format!("payment gateway: {e}"))
                    }
                })
        })
        .await?;
        crash_point(CrashPoint::AfterGatewayCall);
        let now = Utc::now();
        let completed = RefundCompleted::of(
            canceled.order_id,
            canceled.payment_id.clone(),
            canceled.amount_cents,
            receipt.refund_id.clone(),
            now,
        )
        .to_record()
        .map_err(|e| HandlerError::Permanent(format!("cannot encode refund.completed: {e}")))?;
        Ok(NewRefund {
            row: RefundRow {
                id: Uuid::now_v7(),
                order_id: canceled.order_id.as_uuid(),
                event_id: message_id,
                payment_id: canceled.payment_id.as_str().to_owned(),
                amount_cents: canceled.amount_cents.cents(),
                gateway_refund_id: receipt.refund_id,
                status: "completed".to_owned(),
                created_at: now,
                updated_at: now,
            },
            completed,
        })
    }

    /// Raises `refund.failed` for a request about to be shelved, if it is
    /// the order's own refund failing: an event the order record does not
    /// back (forged, or not canceled) is not the order's business, and its
    /// order must not be marked for it.
    async fn report_failure(
        &self,
        message_id: Uuid,
        canceled: &OrderCanceled,
        reason: &str,
    ) -> Result<(), HandlerError> {
        let mut conn = self.db.get().await.map_err(StoreError::from)?;
        let order = orders::find(&mut conn, canceled.order_id).await?;
        if canceled.event_id.as_uuid() != message_id
            || authorize_refund(order.as_ref(), canceled).is_err()
        {
            return Ok(());
        }
        let failed = RefundFailed::of(
            EventId::from_uuid(message_id),
            canceled.order_id,
            reason,
            Utc::now(),
        )
        .to_record()
        .map_err(|e| HandlerError::Permanent(format!("cannot encode refund.failed: {e}")))?;
        let asked_by = message_id.to_string();
        outbox::insert_committed(&mut conn, &[(&failed, Some(asked_by.as_str()))])
            .await
            .map_err(StoreError::classify)?;
        Ok(())
    }

    async fn record_one_by_one(
        &self,
        refunds: &[NewRefund],
        inbox_only: &[Uuid],
    ) -> (
        Vec<Result<Recorded, StoreError>>,
        Vec<Result<bool, StoreError>>,
    ) {
        let mut recorded = Vec::with_capacity(refunds.len());
        let mut inboxed = Vec::with_capacity(inbox_only.len());
        for row in refunds {
            recorded.push(match self.db.get().await {
                Ok(mut conn) => refunds::record_with_inbox(&mut conn, NAME, row).await,
                Err(e) => Err(e.into()),
            });
        }
        for id in inbox_only {
            inboxed.push(match self.db.get().await {
                Ok(mut conn) => inbox::record(&mut conn, NAME, *id)
                    .await
                    .map_err(StoreError::classify),
                Err(e) => Err(e.into()),
            });
        }
        (recorded, inboxed)
    }
}

fn from_recorded(recorded: Recorded) -> Handled {
    match recorded {
        Recorded::New => Handled::Done,
        Recorded::AlreadyProcessed | Recorded::OrderAlreadyRefunded => Handled::AlreadyProcessed,
    }
}

impl Handler for RefundHandler {
    fn name(&self) -> &str {
        NAME
    }

    /// Every inbox row of ours is written with the order's refund, or for an
    /// order refunded already: a processed message's order has its refund,
    /// which the precheck reads anyway (`AlreadyRefunded`: no gateway call,
    /// only the inbox row, which is there, so the message counts as a
    /// duplicate absorbed).
    fn checks_inbox_itself(&self) -> bool {
        true
    }

    async fn handle_batch(&self, batch: &[Work<'_>], deadline: Duration) -> Outcomes {
        let mut outcomes: Vec<Option<Result<Handled, HandlerError>>> =
            batch.iter().map(|_| None).collect();
        let mut events = Vec::with_capacity(batch.len());
        for (slot, work) in outcomes.iter_mut().zip(batch) {
            match work.event {
                IncomingEvent::OrderCanceled(canceled)
                    if canceled.event_id.as_uuid() == work.message_id =>
                {
                    events.push(canceled);
                }
                IncomingEvent::OrderCanceled(canceled) => {
                    *slot = Some(Err(HandlerError::Permanent(format!(
                        "message id {} does not match the event id {}",
                        work.message_id, canceled.event_id
                    ))));
                }
                other => *slot = Some(Err(HandlerError::unexpected(NAME, other))),
            }
        }
        // Items still open, by index, with their event.
        let open: Vec<(usize, &OrderCanceled)> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| o.is_none())
            .map(|(i, _)| i)
            .zip(events)
            .collect();
        let checked = match self
            .precheck(&open.iter().map(|(_, e)| *e).collect::<Vec<_>>())
            .await
        {
            Ok(checked) => checked,
            Err(error) => return fill(outcomes, || Err(HandlerError::from(&error))),
        };
        let mut to_refund = Vec::new();
        let mut inbox_only = Vec::new();
        for ((i, canceled), check) in open.into_iter().zip(checked) {
            match check {
                Ok(Precheck::Refund) => to_refund.push((i, canceled)),
                Ok(Precheck::AlreadyRefunded) => inbox_only.push(i),
                Err(refused) => outcomes[i] = Some(Err(refused)),
            }
        }
        let calls =
            join_all(to_refund.iter().map(|(i, canceled)| {
                self.refund_at_gateway(batch[*i].message_id, canceled, deadline)
            }))
            .await;
        let mut rows = Vec::new();
        let mut row_items = Vec::new();
        for ((i, _), call) in to_refund.into_iter().zip(calls) {
            match call {
                Ok(row) => {
                    rows.push(row);
                    row_items.push(i);
                }
                Err(failed) => outcomes[i] = Some(Err(failed)),
            }
        }
        let inbox_ids: Vec<Uuid> = inbox_only.iter().map(|i| batch[*i].message_id).collect();
        // Every refund of the batch and its inbox row commit together; an
        // already-refunded order's message only gets its inbox row.
        let recorded = match self.db.get().await {
            Ok(mut conn) => {
                refunds::record_batch_with_inbox(&mut conn, NAME, &rows, &inbox_ids).await
            }
            Err(e) => Err(e.into()),
        };
        match recorded {
            Ok(recorded) => {
                for (i, r) in row_items.iter().zip(recorded.refunds) {
                    outcomes[*i] = Some(Ok(from_recorded(r)));
                }
                for i in &inbox_only {
                    outcomes[*i] = Some(Ok(Handled::AlreadyProcessed));
                }
            }
            // Not the connection: one row may be at fault, so each is
            // recorded again on its own and fails alone (DESIGN §10).
            Err(StoreError::Query(error)) => {
                tracing::warn!(%error, "batch commit failed; recording its refunds one by one");
                let (recorded, inboxed) = self.record_one_by_one(&rows, &inbox_ids).await;
                for (i, r) in row_items.iter().zip(recorded) {
                    outcomes[*i] = Some(r.map(from_recorded).map_err(HandlerError::from));
                }
                for (i, r) in inbox_only.iter().zip(inboxed) {
                    outcomes[*i] = Some(
                        r.map(|_| Handled::AlreadyProcessed)
                            .map_err(HandlerError::from),
                    );
                }
            }
            Err(unavailable) => {
                for i in row_items.iter().chain(&inbox_only) {
                    outcomes[*i] = Some(Err(HandlerError::from(&unavailable)));
                }
            }
        }
        fill(outcomes, || {
            Err(HandlerError::Transient("no outcome recorded".to_owned()))
        })
    }

    async fn before_dead_letter(
        &self,
        work: Work<'_>,
        shelved: Shelved<'_>,
    ) -> Result<(), HandlerError> {
        let IncomingEvent::OrderCanceled(canceled) = work.event else {
            return Ok(());
        };
        let reason = match shelved {
            Shelved::Permanent { error } => error.to_owned(),
            Shelved::Exhausted { attempts, error } => {
                format!("gave up after {attempts} attempts: {error}")
            }
        };
        self.report_failure(work.message_id, canceled, &reason)
            .await
    }
}
