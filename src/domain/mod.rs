//! The pure domain: orders, their rules and the events they raise.
//!
//! Nothing here does IO or knows Diesel, lapin or tokio; values are parsed at
//! the boundary into newtypes that cannot hold invalid data, and state changes
//! return the event that the caller must store in the same transaction.

mod events;
mod order;
mod refund;
mod values;

pub use events::{DecodeEventError, EventId, EventRecord, IncomingEvent, OrderCanceled};
pub use order::{CancelError, Order, OrderState, ShipError};
pub use refund::{RefundKey, RefundRefused, authorize_refund};
pub use values::{AmountCents, CustomerEmail, OrderId, PaymentId, ShippingAddress, ValueError};
