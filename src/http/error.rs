//! API errors: the caller's fault (4xx, with a message saying what to fix)
//! apart from ours (5xx, details logged, not leaked).

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed; the Allow header lists the methods this route accepts")]
    MethodNotAllowed,
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Conflict(String),
    /// What was asked for existed and was removed for good (pruned events).
    #[error("{message}")]
    Gone {
        message: String,
        pruned_through: String,
        oldest_available_offset: Option<String>,
    },
    #[error("the database is unavailable; try again shortly")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        match error {
            crate::store::StoreError::Unavailable(e) => Self::Unavailable(e),
            crate::store::StoreError::Query(e) => Self::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Gone {
                pruned_through,
                oldest_available_offset,
                ..
            } => {
                let body = json!({
                    "error": self.to_string(),
                    "pruned_through": pruned_through,
                    "oldest_available_offset": oldest_available_offset,
                });
                return (StatusCode::GONE, Json(body)).into_response();
            }
            Self::Unavailable(detail) => {
                tracing::warn!(%detail, "request failed: database unavailable");
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(detail) => {
                tracing::error!(%detail, "request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}
