//! The order aggregate and its state machine.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{
    AmountCents, CustomerEmail, EventId, OrderCanceled, OrderId, PaymentId, RefundStatus,
    ShippingAddress, ShippingInfoChanged,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    Placed,
    Shipped,
    Canceled,
}

impl OrderState {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Placed => "placed",
            Self::Shipped => "shipped",
            Self::Canceled => "canceled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "placed" => Some(Self::Placed),
            "shipped" => Some(Self::Shipped),
            "canceled" => Some(Self::Canceled),
            _ => None,
        }
    }
}

/// Why an order cannot be canceled; the HTTP API answers 409 with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    #[error("order {0} has already shipped and can no longer be canceled")]
    AlreadyShipped(OrderId),
    #[error("order {0} is already canceled")]
    AlreadyCanceled(OrderId),
}

/// Why an order's shipping address cannot change; the API answers 409.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShippingInfoError {
    #[error("order {0} has already shipped; its shipping address can no longer change")]
    AlreadyShipped(OrderId),
    #[error("order {0} is canceled; it will not ship")]
    Canceled(OrderId),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShipError {
    #[error("order {0} is canceled and cannot ship")]
    Canceled(OrderId),
    #[error("order {0} has already shipped")]
    AlreadyShipped(OrderId),
}

/// An order. `version` grows by one with every state change, and every event
/// carries the version it produced, so consumers can discard stale changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: OrderId,
    pub payment_id: PaymentId,
    pub amount: AmountCents,
    pub customer_email: CustomerEmail,
    pub shipping_address: Option<ShippingAddress>,
    pub state: OrderState,
    pub version: i64,
    /// What the refund context reported of this order's refund. Not an
    /// order change: it raises no event and leaves `version` alone.
    pub refund_status: Option<RefundStatus>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Order {
    pub fn place(
        payment_id: PaymentId,
        amount: AmountCents,
        customer_email: CustomerEmail,
        shipping_address: Option<ShippingAddress>,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            id: OrderId::generate(),
            payment_id,
            amount,
            customer_email,
            shipping_address,
            state: OrderState::Placed,
            version: 1,
            refund_status: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// Cancels the order and returns the event that must be stored with it.
    /// A shipped or already canceled order is refused and left unchanged.
    pub fn cancel(&mut self, now: DateTime<Utc>) -> Result<OrderCanceled, CancelError> {
        match self.state {
            OrderState::Shipped => return Err(CancelError::AlreadyShipped(self.id)),
            OrderState::Canceled => return Err(CancelError::AlreadyCanceled(self.id)),
            OrderState::Placed => {}
        }
        self.state = OrderState::Canceled;
        self.version += 1;
        self.updated_at = now;
        Ok(OrderCanceled {
            event_id: EventId::generate(),
            occurred_at: now,
            order_id: self.id,
            payment_id: self.payment_id.clone(),
            amount_cents: self.amount,
            customer_email: self.customer_email.clone(),
            order_version: self.version,
        })
    }

    /// Changes where the order ships to and returns the event that must be
    /// stored with it; `None` when `address` is the one it already has (a
    /// repeated PUT changes nothing and raises nothing). A shipped or
    /// canceled order is refused and left unchanged.
    pub fn change_shipping_info(
        &mut self,
        address: ShippingAddress,
        now: DateTime<Utc>,
    ) -> Result<Option<ShippingInfoChanged>, ShippingInfoError> {
        match self.state {
            OrderState::Shipped => return Err(ShippingInfoError::AlreadyShipped(self.id)),
            OrderState::Canceled => return Err(ShippingInfoError::Canceled(self.id)),
            OrderState::Placed => {}
        }
        if self.shipping_address.as_ref() == Some(&address) {
            return Ok(None);
        }
        self.shipping_address = Some(address.clone());
        self.version += 1;
        self.updated_at = now;
        Ok(Some(ShippingInfoChanged {
            event_id: EventId::generate(),
            occurred_at: now,
            order_id: self.id,
            shipping_address: address,
            order_version: self.version,
        }))
    }

    /// Takes in what the refund context reported, by [`RefundStatus::converge`];
    /// returns whether the status changed.
    pub fn record_refund_status(&mut self, incoming: RefundStatus) -> bool {
        match RefundStatus::converge(self.refund_status.as_ref(), incoming) {
            Some(status) => {
                self.refund_status = Some(status);
                true
            }
            None => false,
        }
    }

    pub fn ship(&mut self, now: DateTime<Utc>) -> Result<(), ShipError> {
        match self.state {
            OrderState::Canceled => return Err(ShipError::Canceled(self.id)),
            OrderState::Shipped => return Err(ShipError::AlreadyShipped(self.id)),
            OrderState::Placed => {}
        }
        self.state = OrderState::Shipped;
        self.version += 1;
        self.updated_at = now;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> Order {
        let (Ok(payment), Ok(amount), Ok(email)) = (
            PaymentId::parse("pay-1"),
            AmountCents::parse(1250),
            CustomerEmail::parse("ada@example.org"),
        ) else {
            panic!("test values are valid");
        };
        Order::place(payment, amount, email, None, Utc::now())
    }

    #[test]
    fn canceling_a_placed_order_raises_order_canceled_with_the_new_version() {
        let mut order = order();
        let Ok(event) = order.cancel(Utc::now()) else {
            panic!("a placed order can be canceled");
        };
        assert_eq!(order.state, OrderState::Canceled);
        assert_eq!(order.version, 2);
        assert_eq!(event.order_version, 2);
        assert_eq!(event.order_id, order.id);
        assert_eq!(event.amount_cents.cents(), 1250);
        assert_eq!(event.event_id.as_uuid().get_version_num(), 7);
    }

    #[test]
    fn a_shipped_order_cannot_be_canceled() {
        let mut order = order();
        assert!(order.ship(Utc::now()).is_ok());
        let before = order.clone();
        assert_eq!(
            order.cancel(Utc::now()),
            Err(CancelError::AlreadyShipped(order.id))
        );
        assert_eq!(order, before);
    }

    fn address(raw: &str) -> ShippingAddress {
        let Ok(address) = ShippingAddress::parse(raw) else {
            panic!("test address is valid");
        };
        address
    }

    #[test]
    fn changing_the_shipping_address_raises_shipping_info_changed_with_the_new_version() {
        let mut order = order();
        let Ok(Some(first)) = order.change_shipping_info(address("1 Main St"), Utc::now()) else {
            panic!("a placed order's address can change");
        };
        let Ok(Some(second)) = order.change_shipping_info(address("2 High St"), Utc::now()) else {
            panic!("and change again");
        };
        assert_eq!((first.order_version, second.order_version), (2, 3));
        assert_eq!(order.version, 3);
        assert_eq!(order.shipping_address, Some(address("2 High St")));
        assert_eq!(second.shipping_address, address("2 High St"));
    }

    #[test]
    fn the_same_address_again_raises_nothing() {
        let mut order = order();
        assert!(matches!(
            order.change_shipping_info(address("1 Main St"), Utc::now()),
            Ok(Some(_))
        ));
        assert_eq!(
            order.change_shipping_info(address("1 Main St"), Utc::now()),
            Ok(None)
        );
        assert_eq!(order.version, 2);
    }

    #[test]
    fn a_shipped_or_canceled_order_keeps_its_address() {
        let mut shipped = order();
        assert!(shipped.ship(Utc::now()).is_ok());
        assert_eq!(
            shipped.change_shipping_info(address("1 Main St"), Utc::now()),
            Err(ShippingInfoError::AlreadyShipped(shipped.id))
        );
        let mut canceled = order();
        assert!(canceled.cancel(Utc::now()).is_ok());
        let before = canceled.clone();
        assert_eq!(
            canceled.change_shipping_info(address("1 Main St"), Utc::now()),
            Err(ShippingInfoError::Canceled(canceled.id))
        );
        assert_eq!(canceled, before);
    }

    #[test]
    fn an_order_is_canceled_only_once() {
        let mut order = order();
        assert!(order.cancel(Utc::now()).is_ok());
        assert_eq!(
            order.cancel(Utc::now()),
            Err(CancelError::AlreadyCanceled(order.id))
        );
        assert_eq!(order.version, 2);
    }
}
