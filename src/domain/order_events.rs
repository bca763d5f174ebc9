//! The events the order service raises. Each carries the order's version
//! after the change, so a consumer can tell a newer change from a stale one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{
    AmountCents, CustomerEmail, EventId, EventRecord, OrderId, PaymentId, Publisher,
    ShippingAddress, events::Kind,
};

const ORDER: &str = "order";

/// An order was canceled: its payment must be refunded and its customer told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCanceled {
    pub event_id: EventId,
    pub occurred_at: DateTime<Utc>,
    pub order_id: OrderId,
    pub payment_id: PaymentId,
    pub amount_cents: AmountCents,
    pub customer_email: CustomerEmail,
    /// The order's version after the cancel.
    pub order_version: i64,
}

impl OrderCanceled {
    const KIND: Kind = Kind::of(Publisher::Orders, "order.canceled", 1, ORDER);
    pub const TYPE: &'static str = Self::KIND.event_type;
    pub const VERSION: i32 = Self::KIND.event_version;

    /// The form the outbox stores and the relay publishes.
    pub fn to_record(&self) -> Result<EventRecord, serde_json::Error> {
        let (id, at) = (self.event_id, self.occurred_at);
        Self::KIND.record(self, id, self.order_id.to_string(), self.order_version, at)
    }
}

/// An order's shipping address changed. Applied in version order by the
/// shipping read model: a change older than what it holds is skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShippingInfoChanged {
    pub event_id: EventId,
    pub occurred_at: DateTime<Utc>,
    pub order_id: OrderId,
    pub shipping_address: ShippingAddress,
    /// The order's version after the change.
    pub order_version: i64,
}

impl ShippingInfoChanged {
    const KIND: Kind = Kind::of(Publisher::Orders, "order.shipping-info-changed", 1, ORDER);
    pub const TYPE: &'static str = Self::KIND.event_type;
    pub const VERSION: i32 = Self::KIND.event_version;

    pub fn to_record(&self) -> Result<EventRecord, serde_json::Error> {
        let (id, at) = (self.event_id, self.occurred_at);
        Self::KIND.record(self, id, self.order_id.to_string(), self.order_version, at)
    }
}
