//! The shipping-sync consumer: keeps the `shipments` read model of where each
//! order ships to (P9). A change is applied only if its order version is
//! newer than the one held; an older one is recorded as processed and
//! counted as skipped, so the newest address wins whatever order the events
//! arrive in (out of order, through the retry tiers, or many times over).

use diesel_async::AsyncPgConnection;

use super::{Handled, HandlerError, Work, recording::Recording};
use crate::{
    domain::IncomingEvent,
    store::{
        StoreError,
        shipments::{self, Applied, ShippingChange},
    },
};

pub const NAME: &str = "shipping-sync";

pub struct ShippingSync;

impl Recording for ShippingSync {
    const NAME: &'static str = NAME;
    type Item = ShippingChange;
    type Recorded = Applied;

    fn item_of(work: &Work<'_>) -> Result<ShippingChange, HandlerError> {
        match work.event {
            IncomingEvent::ShippingInfoChanged(changed) => Ok(ShippingChange {
                message_id: work.message_id,
                order_id: changed.order_id.as_uuid(),
                shipping_address: changed.shipping_address.as_str().to_owned(),
                order_version: changed.order_version,
            }),
            other => Err(HandlerError::unexpected(NAME, other)),
        }
    }

    async fn record(
        conn: &mut AsyncPgConnection,
        items: &[ShippingChange],
    ) -> Result<Vec<Applied>, StoreError> {
        shipments::apply_batch_with_inbox(conn, NAME, items).await
    }

    fn outcome_of(_: &ShippingChange, applied: Applied) -> Result<Handled, HandlerError> {
        Ok(match applied {
            Applied::Applied => Handled::Done,
            Applied::Stale => Handled::Skipped,
            Applied::AlreadyProcessed => Handled::AlreadyProcessed,
        })
    }
}
