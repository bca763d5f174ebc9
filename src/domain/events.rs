//! Domain events: what happened, in the past tense, with the minimum data a
//! handler needs, and the record form the outbox stores.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{AmountCents, CustomerEmail, OrderId, PaymentId, values::uuid_v7_id};

uuid_v7_id!(
    /// An event's id. It is the AMQP `message_id`, the consumers' inbox key
    /// and the gateway's idempotency key.
    EventId
);

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
    pub const TYPE: &'static str = "order.canceled";
    pub const VERSION: i32 = 1;

    /// The form the outbox stores and the relay publishes.
    pub fn to_record(&self) -> Result<EventRecord, serde_json::Error> {
        Ok(EventRecord {
            event_id: self.event_id,
            event_type: Self::TYPE,
            event_version: Self::VERSION,
            aggregate_type: "order",
            aggregate_id: self.order_id.to_string(),
            aggregate_version: self.order_version,
            occurred_at: self.occurred_at,
            payload: serde_json::to_value(self)?,
        })
    }
}

/// An event ready to store: its identity, its aggregate and its JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub event_id: EventId,
    pub event_type: &'static str,
    pub event_version: i32,
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    pub aggregate_version: i64,
    pub occurred_at: DateTime<Utc>,
    pub payload: serde_json::Value,
}

/// An event a consumer received, decoded from its type and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncomingEvent {
    OrderCanceled(OrderCanceled),
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

impl IncomingEvent {
    pub fn decode(event_type: &str, body: &[u8]) -> Result<Self, DecodeEventError> {
        match event_type {
            OrderCanceled::TYPE => serde_json::from_slice(body)
                .map(Self::OrderCanceled)
                .map_err(|e| DecodeEventError::InvalidBody {
                    event_type: OrderCanceled::TYPE,
                    reason: e.to_string(),
                }),
            other => Err(DecodeEventError::UnknownType(other.to_owned())),
        }
    }

    pub fn event_type(&self) -> &'static str {
        match self {
            Self::OrderCanceled(_) => OrderCanceled::TYPE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_canceled_record_round_trips_through_decode() {
        let (Ok(payment), Ok(amount), Ok(email)) = (
            PaymentId::parse("pay-9"),
            AmountCents::parse(99),
            CustomerEmail::parse("x@y.z"),
        ) else {
            panic!("valid test values");
        };
        let event = OrderCanceled {
            event_id: EventId::generate(),
            occurred_at: Utc::now(),
            order_id: OrderId::generate(),
            payment_id: payment,
            amount_cents: amount,
            customer_email: email,
            order_version: 2,
        };
        let Ok(record) = event.to_record() else {
            panic!("serializable");
        };
        let body = record.payload.to_string();
        assert_eq!(
            IncomingEvent::decode(record.event_type, body.as_bytes()),
            Ok(IncomingEvent::OrderCanceled(event))
        );
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
    }
}
