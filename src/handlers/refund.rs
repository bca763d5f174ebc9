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
//! The refund and the inbox row then commit in one transaction. If we die
//! between the gateway call and the commit, the redelivery calls the gateway
//! with the same key and gets the same refund back: one refund.

use chrono::Utc;
use uuid::Uuid;

use super::{Handled, Handler, HandlerError};
use crate::{
    domain::{IncomingEvent, OrderCanceled, RefundKey, authorize_refund},
    faults::{CrashPoint, crash_point},
    gateway::client::{GatewayClient, GatewayError},
    store::{
        DbPool, StoreError, inbox, orders,
        refunds::{self, Recorded, RefundRow},
    },
};

pub const NAME: &str = "refunds";

pub struct RefundHandler {
    db: DbPool,
    gateway: GatewayClient,
}

/// What the order record says before any money moves.
enum Precheck {
    Refund,
    /// The order has its refund already; this message is recorded as processed.
    AlreadyRefunded,
}

impl RefundHandler {
    pub fn new(db: DbPool, gateway: GatewayClient) -> Self {
        Self { db, gateway }
    }

    /// Reads what we trust (our refunds, the order record) on a connection
    /// that is given back before the gateway call, so a slow gateway does not
    /// hold database connections.
    async fn precheck(
        &self,
        message_id: Uuid,
        canceled: &OrderCanceled,
    ) -> Result<Precheck, HandlerError> {
        let mut conn = self.db.get().await.map_err(StoreError::from)?;
        let order = match orders::find_with_refund(&mut conn, canceled.order_id).await? {
            Some((_, true)) => {
                inbox::record(&mut conn, NAME, message_id)
                    .await
                    .map_err(StoreError::classify)?;
                return Ok(Precheck::AlreadyRefunded);
            }
            Some((order, false)) => Some(order),
            None => None,
        };
        authorize_refund(order.as_ref(), canceled)
            .map_err(|refused| HandlerError::Permanent(refused.to_string()))?;
        Ok(Precheck::Refund)
    }
}

impl Handler for RefundHandler {
    fn name(&self) -> &str {
        NAME
    }

    async fn handle(
        &self,
        message_id: Uuid,
        event: &IncomingEvent,
    ) -> Result<Handled, HandlerError> {
        let IncomingEvent::OrderCanceled(canceled) = event;
        if canceled.event_id.as_uuid() != message_id {
            return Err(HandlerError::Permanent(format!(
                "message id {message_id} does not match the event id {}",
                canceled.event_id
            )));
        }
        if let Precheck::AlreadyRefunded = self.precheck(message_id, canceled).await? {
            return Ok(Handled::AlreadyProcessed);
        }
        let receipt = self
            .gateway
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
            })?;
        crash_point(CrashPoint::AfterGatewayCall);
        let now = Utc::now();
        let row = RefundRow {
            id: Uuid::now_v7(),
            order_id: canceled.order_id.as_uuid(),
            event_id: message_id,
            payment_id: canceled.payment_id.as_str().to_owned(),
            amount_cents: canceled.amount_cents.cents(),
            gateway_refund_id: receipt.refund_id,
            status: "completed".to_owned(),
            created_at: now,
            updated_at: now,
        };
        let mut conn = self.db.get().await.map_err(StoreError::from)?;
        match refunds::record_with_inbox(&mut conn, NAME, &row).await? {
            Recorded::New => Ok(Handled::Done),
            Recorded::AlreadyProcessed | Recorded::OrderAlreadyRefunded => {
                Ok(Handled::AlreadyProcessed)
            }
        }
    }
}
