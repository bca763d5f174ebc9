//! The events the refund context raises about an order's one refund, for the
//! order service to show. Their aggregate is the order's refund (keyed by the
//! order, as [`super::RefundKey`] is), and it has a single version: how its
//! events combine is the rule of [`super::RefundStatus`], not a version order.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{AmountCents, EventId, EventRecord, OrderId, PaymentId, Publisher, events::Kind};

const REFUND: &str = "refund";
const REFUND_VERSION: i64 = 1;

/// The longest failure reason an event carries; the gateway's error, cut.
pub const MAX_REASON_BYTES: usize = 1024;

/// An order's refund was made and recorded by the refund context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundCompleted {
    pub event_id: EventId,
    pub occurred_at: DateTime<Utc>,
    pub order_id: OrderId,
    pub payment_id: PaymentId,
    pub amount_cents: AmountCents,
    /// The payment gateway's id of the refund.
    pub gateway_refund_id: String,
}

impl RefundCompleted {
    const KIND: Kind = Kind::of(Publisher::Refunds, "refund.completed", 1, REFUND);
    pub const TYPE: &'static str = Self::KIND.event_type;

    pub fn of(
        order_id: OrderId,
        payment_id: PaymentId,
        amount_cents: AmountCents,
        gateway_refund_id: String,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            event_id: EventId::generate(),
            occurred_at: now,
            order_id,
            payment_id,
            amount_cents,
            gateway_refund_id,
        }
    }

    pub fn to_record(&self) -> Result<EventRecord, serde_json::Error> {
        let (id, at) = (self.event_id, self.occurred_at);
        Self::KIND.record(self, id, self.order_id.to_string(), REFUND_VERSION, at)
    }
}

/// An order's refund was given up on: the gateway refused it for good, or it
/// kept failing past the last retry tier. The request is parked in the
/// refunds' dead-letter queue, from where an operator may replay it once the
/// cause is fixed; a later [`RefundCompleted`] then supersedes this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundFailed {
    pub event_id: EventId,
    pub occurred_at: DateTime<Utc>,
    pub order_id: OrderId,
    /// Why, for the person who looks at the order.
    pub reason: String,
    /// The refund request that was dead-lettered (its message id).
    pub dead_lettered_message_id: EventId,
}

impl RefundFailed {
    const KIND: Kind = Kind::of(Publisher::Refunds, "refund.failed", 1, REFUND);
    pub const TYPE: &'static str = Self::KIND.event_type;

    /// The failure of the request `dead_lettered`. Its id is derived from that
    /// request's id, so a redelivery of the same request that fails again
    /// raises the same event, which is stored once.
    pub fn of(dead_lettered: EventId, order_id: OrderId, reason: &str, now: DateTime<Utc>) -> Self {
        Self {
            event_id: EventId::derived(&format!("{}/{dead_lettered}", Self::TYPE)),
            occurred_at: now,
            order_id,
            reason: crate::text::truncate_utf8(reason, MAX_REASON_BYTES),
            dead_lettered_message_id: dead_lettered,
        }
    }

    pub fn to_record(&self) -> Result<EventRecord, serde_json::Error> {
        let (id, at) = (self.event_id, self.occurred_at);
        Self::KIND.record(self, id, self.order_id.to_string(), REFUND_VERSION, at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_dead_letter_raises_the_same_refund_failed_event() {
        let (message, order) = (EventId::generate(), OrderId::generate());
        let first = RefundFailed::of(message, order, "422", Utc::now());
        let again = RefundFailed::of(message, order, "422", Utc::now());
        assert_eq!(first.event_id, again.event_id);
        let other = RefundFailed::of(EventId::generate(), order, "422", Utc::now());
        assert_ne!(first.event_id, other.event_id);
    }

    #[test]
    fn a_long_reason_is_cut() {
        let failed = RefundFailed::of(
            EventId::generate(),
            OrderId::generate(),
            &"é".repeat(MAX_REASON_BYTES),
            Utc::now(),
        );
        assert!(failed.reason.len() <= MAX_REASON_BYTES);
    }
}
