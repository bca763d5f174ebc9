//! The order service's HTTP API (axum): orders, and its events for pull
//! readers; and the server loop all our HTTP services share. Requests are
//! parsed into domain values at this boundary; a bad request gets a 4xx with
//! a message.

mod cancel_queue;
mod error;
mod events;
mod orders;
mod server;

pub use cancel_queue::{CancelBatching, CancelQueue};
pub use error::ApiError;
pub use events::{DEFAULT_LIMIT, EventsPage, MAX_LIMIT, PublishedEvent};
pub use orders::{MAX_BODY_BYTES, router};
pub use server::serve;
