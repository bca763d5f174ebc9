//! The order service's HTTP API (axum). Requests are parsed into domain
//! values at this boundary; a bad request gets a 4xx with a message.

mod error;
mod orders;

pub use error::ApiError;
pub use orders::router;
