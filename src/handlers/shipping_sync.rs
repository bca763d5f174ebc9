//! The shipping-sync handler: keeps the `shipments` read model of where each
//! order ships to (P9). A change is applied only if its order version is
//! newer than the one held; an older one is recorded as processed and
//! counted as skipped, so the newest address wins whatever order the events
//! arrive in (out of order, through the retry tiers, or many times over).

use std::time::Duration;

use diesel_async::AsyncPgConnection;

use super::{Handled, Handler, HandlerError, Outcomes, RecordBatch, Work, handle_by_recording};
use crate::{
    domain::IncomingEvent,
    store::{
        DbPool, StoreError,
        shipments::{self, Applied, ShippingChange},
    },
};

pub const NAME: &str = "shipping-sync";

pub struct ShippingSyncHandler {
    db: DbPool,
}

impl ShippingSyncHandler {
    pub fn new(db: DbPool) -> Self {
        Self { db }
    }
}

impl RecordBatch<ShippingChange> for ShippingSyncHandler {
    type Recorded = Applied;

    async fn record(
        &self,
        conn: &mut AsyncPgConnection,
        items: &[ShippingChange],
    ) -> Result<Vec<Applied>, StoreError> {
        shipments::apply_batch_with_inbox(conn, NAME, items).await
    }
}

impl Handler for ShippingSyncHandler {
    fn name(&self) -> &str {
        NAME
    }

    /// Applies the batch's changes and their inbox rows in one transaction;
    /// no external call, so `deadline` is not needed.
    async fn handle_batch(&self, batch: &[Work<'_>], _deadline: Duration) -> Outcomes {
        handle_by_recording(
            &self.db,
            self,
            batch,
            |work| match work.event {
                IncomingEvent::ShippingInfoChanged(changed) => Ok(ShippingChange {
                    message_id: work.message_id,
                    order_id: changed.order_id.as_uuid(),
                    shipping_address: changed.shipping_address.as_str().to_owned(),
                    order_version: changed.order_version,
                }),
                other => Err(HandlerError::unexpected(NAME, other)),
            },
            |_, applied| {
                Ok(match applied {
                    Applied::Applied => Handled::Done,
                    Applied::Stale => Handled::Skipped,
                    Applied::AlreadyProcessed => Handled::AlreadyProcessed,
                })
            },
        )
        .await
    }
}
