//! The pure domain: orders, their rules and the events they raise, and the
//! refund context's rules and events.
//!
//! Nothing here does IO or knows Diesel, lapin or tokio; values are parsed at
//! the boundary into newtypes that cannot hold invalid data, and state changes
//! return the event that the caller must store in the same transaction.

mod events;
mod order;
mod order_events;
mod refund;
mod refund_events;
mod refund_status;
mod values;

pub use events::{DecodeEventError, EventId, EventRecord, IncomingEvent, Publisher};
pub use order::{CancelError, Order, OrderState, ShipError, ShippingInfoError};
pub use order_events::{OrderCanceled, ShippingInfoChanged};
pub use refund::{RefundKey, RefundRefused, authorize_refund};
pub use refund_events::{RefundCompleted, RefundFailed};
pub use refund_status::RefundStatus;
pub use values::{AmountCents, CustomerEmail, OrderId, PaymentId, ShippingAddress, ValueError};
