//! What every domain event shares: its id, which bounded context publishes
//! it, the record form the outbox stores, and the decoding of an incoming
//! message into one of the events courier knows.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

use super::{
    OrderCanceled, RefundCompleted, RefundFailed, ShippingInfoChanged, values::uuid_v7_id,
};

uuid_v7_id!(
    /// An event's id. It is the AMQP `message_id` and the consumers' inbox key.
    EventId
);

impl EventId {
    /// The same id every time for the same `name`: for an event that a
    /// redelivery may raise again and that must then be stored once. A
    /// name-based UUID (v5), so it does not sort by time as v7 ids do.
    pub fn derived(name: &str) -> Self {
        /// courier's namespace for derived event ids (a random v4 UUID).
        const NAMESPACE: Uuid = Uuid::from_u128(0x6d1e_55a0_4d6b_4b8e_9c6e_1f0a_7e3c_2b5d);
        Self::from_uuid(Uuid::new_v5(&NAMESPACE, name.as_bytes()))
    }
}

/// The bounded context that raises an event: its own outbox rows, its own
/// relay, its own exchange and its own broker user. Only the order service
/// publishes order events, and only the refund side publishes refund events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Publisher {
    /// The order service: `order.canceled`, `order.shipping-info-changed`.
    Orders,
    /// The refund context: `refund.completed`, `refund.failed`.
    Refunds,
}

impl Publisher {
    pub const ALL: [Publisher; 2] = [Self::Orders, Self::Refunds];

    /// The value of the outbox's `publisher` column.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Orders => "orders",
            Self::Refunds => "refunds",
        }
    }
}

/// An event ready to store: its identity, its aggregate and its JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub event_id: EventId,
    pub publisher: Publisher,
    pub event_type: &'static str,
    pub event_version: i32,
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    pub aggregate_version: i64,
    pub occurred_at: DateTime<Utc>,
    pub payload: serde_json::Value,
}

/// The constant facts of one kind of event, from which its record is built.
pub(super) struct Kind {
    pub publisher: Publisher,
    pub event_type: &'static str,
    pub event_version: i32,
    pub aggregate_type: &'static str,
}

impl Kind {
    pub(super) const fn of(
        publisher: Publisher,
        event_type: &'static str,
        event_version: i32,
        aggregate_type: &'static str,
    ) -> Self {
        Self {
            publisher,
            event_type,
            event_version,
            aggregate_type,
        }
    }

    /// `event` as the outbox stores it.
    pub(super) fn record<E: Serialize>(
        &self,
        event: &E,
        event_id: EventId,
        aggregate_id: String,
        aggregate_version: i64,
        occurred_at: DateTime<Utc>,
    ) -> Result<EventRecord, serde_json::Error> {
        Ok(EventRecord {
            event_id,
            publisher: self.publisher,
            event_type: self.event_type,
            event_version: self.event_version,
            aggregate_type: self.aggregate_type,
            aggregate_id,
            aggregate_version,
            occurred_at,
            payload: serde_json::to_value(event)?,
        })
    }
}

/// An event a consumer received, decoded from its type and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncomingEvent {
    OrderCanceled(OrderCanceled),
    ShippingInfoChanged(ShippingInfoChanged),
    RefundCompleted(RefundCompleted),
    RefundFailed(RefundFailed),
}

/// Why a body could not become an event; such a message is poison.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeEventError {
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    #[error("body is not a valid `{event_type}` event: {reason}")]
    InvalidBody {
        event_type: &'static str,
        reason: String,
    },
}

fn body<T: DeserializeOwned>(event_type: &'static str, body: &[u8]) -> Result<T, DecodeEventError> {
    serde_json::from_slice(body).map_err(|e| DecodeEventError::InvalidBody {
        event_type,
        reason: e.to_string(),
    })
}

impl IncomingEvent {
    pub fn decode(event_type: &str, raw: &[u8]) -> Result<Self, DecodeEventError> {
        match event_type {
            OrderCanceled::TYPE => body(OrderCanceled::TYPE, raw).map(Self::OrderCanceled),
            ShippingInfoChanged::TYPE => {
                body(ShippingInfoChanged::TYPE, raw).map(Self::ShippingInfoChanged)
            }
            RefundCompleted::TYPE => body(RefundCompleted::TYPE, raw).map(Self::RefundCompleted),
            RefundFailed::TYPE => body(RefundFailed::TYPE, raw).map(Self::RefundFailed),
            other => Err(DecodeEventError::UnknownType(other.to_owned())),
        }
    }

    pub fn event_type(&self) -> &'static str {
        match self {
            Self::OrderCanceled(_) => OrderCanceled::TYPE,
            Self::ShippingInfoChanged(_) => ShippingInfoChanged::TYPE,
            Self::RefundCompleted(_) => RefundCompleted::TYPE,
            Self::RefundFailed(_) => RefundFailed::TYPE,
        }
    }

    /// The event's own id, which a genuine message carries as its message id.
    pub fn event_id(&self) -> EventId {
        match self {
            Self::OrderCanceled(e) => e.event_id,
            Self::ShippingInfoChanged(e) => e.event_id,
            Self::RefundCompleted(e) => e.event_id,
            Self::RefundFailed(e) => e.event_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AmountCents, CustomerEmail, OrderId, PaymentId, ShippingAddress};

    fn canceled() -> anyhow::Result<OrderCanceled> {
        Ok(OrderCanceled {
            event_id: EventId::generate(),
            occurred_at: Utc::now(),
            order_id: OrderId::generate(),
            payment_id: PaymentId::parse("pay-9")?,
            amount_cents: AmountCents::parse(99)?,
            customer_email: CustomerEmail::parse("x@y.z")?,
            order_version: 2,
        })
    }

    fn round_trip(record: &EventRecord) -> Result<IncomingEvent, DecodeEventError> {
        IncomingEvent::decode(record.event_type, record.payload.to_string().as_bytes())
    }

    #[test]
    fn every_event_record_round_trips_through_decode() -> anyhow::Result<()> {
        let canceled = canceled()?;
        let changed = ShippingInfoChanged {
            event_id: EventId::generate(),
            occurred_at: Utc::now(),
            order_id: canceled.order_id,
            shipping_address: ShippingAddress::parse("1 Main St")?,
            order_version: 3,
        };
        let completed = RefundCompleted::of(
            canceled.order_id,
            canceled.payment_id.clone(),
            canceled.amount_cents,
            "rf_1".to_owned(),
            Utc::now(),
        );
        let failed = RefundFailed::of(canceled.event_id, canceled.order_id, "422", Utc::now());
        for (record, event) in [
            (
                canceled.to_record()?,
                IncomingEvent::OrderCanceled(canceled.clone()),
            ),
            (
                changed.to_record()?,
                IncomingEvent::ShippingInfoChanged(changed),
            ),
            (
                completed.to_record()?,
                IncomingEvent::RefundCompleted(completed),
            ),
            (failed.to_record()?, IncomingEvent::RefundFailed(failed)),
        ] {
            assert_eq!(record.event_id, event.event_id());
            assert_eq!(round_trip(&record), Ok(event));
        }
        Ok(())
    }

    #[test]
    fn order_events_are_published_by_the_order_service_and_refund_events_by_the_refund_side()
    -> anyhow::Result<()> {
        let canceled = canceled()?;
        assert_eq!(canceled.to_record()?.publisher, Publisher::Orders);
        let failed = RefundFailed::of(canceled.event_id, canceled.order_id, "x", Utc::now());
        assert_eq!(failed.to_record()?.publisher, Publisher::Refunds);
        Ok(())
    }

    #[test]
    fn a_derived_id_is_the_same_for_the_same_name_only() {
        assert_eq!(EventId::derived("a"), EventId::derived("a"));
        assert_ne!(EventId::derived("a"), EventId::derived("b"));
    }

    #[test]
    fn unknown_types_and_bad_bodies_are_refused() {
        assert!(matches!(
            IncomingEvent::decode("order.exploded", b"{}"),
            Err(DecodeEventError::UnknownType(_))
        ));
        assert!(matches!(
            IncomingEvent::decode(OrderCanceled::TYPE, b"{not json"),
            Err(DecodeEventError::InvalidBody { .. })
        ));
        assert!(matches!(
            IncomingEvent::decode(OrderCanceled::TYPE, br#"{"amount_cents": -1}"#),
            Err(DecodeEventError::InvalidBody { .. })
        ));
        assert!(matches!(
            IncomingEvent::decode(ShippingInfoChanged::TYPE, br#"{"shipping_address": ""}"#),
            Err(DecodeEventError::InvalidBody { .. })
        ));
    }
}
