//! The refund rules that money depends on (P4, P10), pure:
//! - a canceled order has at most one refund, ever, so the refund's identity
//!   (and the payment gateway's idempotency key) comes from the order, never
//!   from the message that asked for it;
//! - money moves only for what the order service decided: the event must
//!   agree with the order record it names.

use super::{Order, OrderCanceled, OrderId, OrderState};

/// The identity of the one refund an order may have. Sent to the payment
/// gateway as its `Idempotency-Key`: a second event, a replay under a new
/// message id or a forged copy all carry the same order, so they all get the
/// same refund back instead of a new one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RefundKey(String);

const KEY_PREFIX: &str = "refund-of-order-";

impl RefundKey {
    pub fn for_order(order: OrderId) -> Self {
        Self(format!("{KEY_PREFIX}{order}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The order a key was made for; `None` for a key courier did not make.
    /// Checkers read the gateway's ledger with it.
    pub fn order_of(key: &str) -> Option<OrderId> {
        key.strip_prefix(KEY_PREFIX)
            .and_then(|raw| uuid::Uuid::parse_str(raw).ok())
            .map(OrderId::from_uuid)
    }
}

impl std::fmt::Display for RefundKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an `order.canceled` event does not justify a refund. Each is permanent:
/// the order record will not change its mind, so retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefundRefused {
    #[error("order {0} does not exist")]
    UnknownOrder(OrderId),
    #[error("order {order} is not canceled (it is {state})")]
    NotCanceled { order: OrderId, state: &'static str },
    #[error("payment {claimed} is not the payment {actual} of order {order}")]
    PaymentMismatch {
        order: OrderId,
        claimed: String,
        actual: String,
    },
    #[error("amount {claimed} exceeds the order's {actual}")]
    AmountExceeds { claimed: i64, actual: i64 },
    #[error("amount {claimed} is not the order's {actual}")]
    AmountMismatch { claimed: i64, actual: i64 },
}

/// Checks `event` against the order record it names (`None`: no such order).
/// Only an event that agrees with a canceled order on payment and amount may
/// move money; the refund is then the order's full amount. A smaller amount is
/// refused too: with one refund per order, a partial one would block the rest.
pub fn authorize_refund(order: Option<&Order>, event: &OrderCanceled) -> Result<(), RefundRefused> {
    let order = order.ok_or(RefundRefused::UnknownOrder(event.order_id))?;
    if order.state != OrderState::Canceled {
        return Err(RefundRefused::NotCanceled {
            order: order.id,
            state: order.state.as_str(),
        });
    }
    if order.payment_id != event.payment_id {
        return Err(RefundRefused::PaymentMismatch {
            order: order.id,
            claimed: event.payment_id.as_str().to_owned(),
            actual: order.payment_id.as_str().to_owned(),
        });
    }
    let (claimed, actual) = (event.amount_cents.cents(), order.amount.cents());
    if claimed > actual {
        return Err(RefundRefused::AmountExceeds { claimed, actual });
    }
    if claimed != actual {
        return Err(RefundRefused::AmountMismatch { claimed, actual });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::domain::{AmountCents, CustomerEmail, PaymentId};

    fn canceled_order() -> anyhow::Result<(Order, OrderCanceled)> {
        let mut order = Order::place(
            PaymentId::parse("pay-1")?,
            AmountCents::parse(1999)?,
            CustomerEmail::parse("ada@example.org")?,
            None,
            Utc::now(),
        );
        let event = order.cancel(Utc::now())?;
        Ok((order, event))
    }

    #[test]
    fn the_refund_key_comes_from_the_order_and_reads_back() {
        let order = OrderId::generate();
        let key = RefundKey::for_order(order);
        assert_eq!(key, RefundKey::for_order(order));
        assert_eq!(RefundKey::order_of(key.as_str()), Some(order));
        assert_eq!(
            RefundKey::order_of("0190b0e0-0000-7000-8000-000000000000"),
            None
        );
    }

    #[test]
    fn an_event_that_agrees_with_its_canceled_order_is_authorized() -> anyhow::Result<()> {
        let (order, event) = canceled_order()?;
        assert_eq!(authorize_refund(Some(&order), &event), Ok(()));
        Ok(())
    }

    #[test]
    fn an_event_for_an_unknown_order_is_refused() -> anyhow::Result<()> {
        let (_, event) = canceled_order()?;
        assert_eq!(
            authorize_refund(None, &event),
            Err(RefundRefused::UnknownOrder(event.order_id))
        );
        Ok(())
    }

    #[test]
    fn an_event_for_an_order_that_is_not_canceled_is_refused() -> anyhow::Result<()> {
        let (mut order, event) = canceled_order()?;
        order.state = OrderState::Placed;
        let refused = authorize_refund(Some(&order), &event)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            refused,
            Some(format!("order {} is not canceled (it is placed)", order.id))
        );
        Ok(())
    }

    #[test]
    fn a_larger_smaller_or_foreign_claim_is_refused() -> anyhow::Result<()> {
        let (order, event) = canceled_order()?;
        let mut larger = event.clone();
        larger.amount_cents = AmountCents::parse(99_999_999)?;
        assert_eq!(
            authorize_refund(Some(&order), &larger)
                .err()
                .map(|e| e.to_string()),
            Some("amount 99999999 exceeds the order's 1999".to_owned())
        );
        let mut smaller = event.clone();
        smaller.amount_cents = AmountCents::parse(1)?;
        assert!(matches!(
            authorize_refund(Some(&order), &smaller),
            Err(RefundRefused::AmountMismatch { .. })
        ));
        let mut foreign = event;
        foreign.payment_id = PaymentId::parse("pay-someone-else")?;
        assert!(matches!(
            authorize_refund(Some(&order), &foreign),
            Err(RefundRefused::PaymentMismatch { .. })
        ));
        Ok(())
    }
}
