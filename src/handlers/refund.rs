//! The refund handler: refunds a canceled order's payment through the
//! gateway, with the event id as the idempotency key, then records the refund
//! and the inbox row in one transaction. If we die between the gateway call
//! and the commit, the redelivery calls the gateway with the same key and
//! gets the same refund back: one refund.

use chrono::Utc;
use uuid::Uuid;

use super::{Handled, Handler, HandlerError};
use crate::{
    domain::IncomingEvent,
    faults::{CrashPoint, crash_point},
    gateway::client::{GatewayClient, GatewayError},
    store::{
        DbPool, StoreError,
        refunds::{self, Recorded, RefundRow},
    },
};

pub const NAME: &str = "refunds";

pub struct RefundHandler {
    db: DbPool,
    gateway: GatewayClient,
}

impl RefundHandler {
    pub fn new(db: DbPool, gateway: GatewayClient) -> Self {
        Self { db, gateway }
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
        let receipt = self
            .gateway
            .refund(
                canceled.event_id,
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
            Recorded::AlreadyProcessed => Ok(Handled::AlreadyProcessed),
        }
    }
}
