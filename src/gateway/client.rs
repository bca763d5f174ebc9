//! Our client of the external payment gateway, and the gateway's wire contract
//! (request, ledger and stats bodies, header names) that the simulator serves.
//!
//! It owns one decision the refund handler branches on: is a failure worth
//! retrying ([`GatewayError::Transient`]) or final ([`GatewayError::Permanent`])?
//! Every refund carries the order's [`RefundKey`] as `Idempotency-Key`, so a
//! retry after a lost answer, or a second event for the same order, can never
//! refund twice. It knows nothing of the broker, the
//! database or the handlers.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    config::GatewaySettings,
    domain::{AmountCents, PaymentId, RefundKey},
};

/// The request header that makes a refund idempotent.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// The response header set to `true` when the gateway answered an earlier refund again.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// How long an idle keep-alive connection to the gateway is kept for reuse.
const IDLE_CONNECTION_LIFETIME: Duration = Duration::from_secs(5);
/// Error messages are cut to this many bytes: they end up in logs and AMQP headers.
pub const MAX_ERROR_BYTES: usize = 1024;

/// The body of `POST /refunds`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundRequest {
    pub payment_id: String,
    pub amount_cents: i64,
}

/// One refund the gateway made: the body of a successful `POST /refunds` and
/// an element of `GET /refunds`. Plain strings, not domain newtypes: this is
/// what the outside world says, and checkers must be able to read all of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub refund_id: String,
    pub payment_id: String,
    pub amount_cents: i64,
    pub idempotency_key: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
}

/// The body of `GET /stats`: counters since the gateway started, so a run can
/// prove that the faults it asked for really happened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayStats {
    /// Every `POST /refunds`, whatever its outcome.
    pub requests: u64,
    pub refunds_created: u64,
    /// Answers given again for a key that already had a refund.
    pub replayed: u64,
    pub transient_failures: u64,
    /// Refusals of payments that can never be refunded.
    pub permanent_failures: u64,
    /// Malformed requests: missing key, bad body, a key reused for another refund.
    #[serde(default)]
    pub rejected: u64,
}

/// What a successful refund call tells the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundReceipt {
    pub refund_id: String,
    /// The gateway had already made this refund for this key (an earlier
    /// attempt succeeded but its answer was lost, or a duplicate delivery).
    pub replayed: bool,
}

/// Why a gateway call failed. The message names the HTTP status and the
/// gateway's own error text when there was an answer, and is at most
/// [`MAX_ERROR_BYTES`] long.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// Retrying later with the same idempotency key may succeed: 5xx, 429,
    /// 408, timeouts, connection errors, and 2xx answers we could not read.
    #[error("{0}")]
    Transient(String),
    /// The gateway refused the request itself (any other 4xx); retrying
    /// the same request cannot help.
    #[error("{0}")]
    Permanent(String),
}

impl GatewayError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Transient(message) | Self::Permanent(message) => message,
        }
    }
}

/// A client of the payment gateway; cheap to clone (connections are pooled and shared).
#[derive(Debug, Clone)]
pub struct GatewayClient {
    http: reqwest::Client,
    base_url: String,
    timeout: Duration,
}

impl GatewayClient {
    /// Every call is bounded by `settings.timeout`, connecting included, so a
    /// hung gateway turns into a transient error instead of a stuck consumer.
    pub fn new(settings: &GatewaySettings) -> anyhow::Result<Self> {
        let base_url = settings.url.trim_end_matches('/').to_owned();
        reqwest::Url::parse(&base_url)
            .with_context(|| format!("gateway.url `{}` is not a valid URL", settings.url))?;
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            // Give idle connections up well before a server closes them
            // (ours after http.header_read_timeout, 10 s), so a request does
            // not race the server's close on a stale keep-alive connection.
            .pool_idle_timeout(IDLE_CONNECTION_LIFETIME)
            .build()
            .context("cannot build the payment gateway's HTTP client")?;
        Ok(Self {
            http,
            base_url,
            timeout: settings.timeout,
        })
    }

    /// Refunds `amount` of `payment_id`, at most once per `idempotency_key`:
    /// calling again with the same key answers the same refund with
    /// `replayed = true`. Reusing a key for a different payment or amount is a
    /// permanent error.
    pub async fn refund(
        &self,
        idempotency_key: &RefundKey,
        payment_id: &PaymentId,
        amount: AmountCents,
    ) -> Result<RefundReceipt, GatewayError> {
        #[derive(Deserialize)]
        struct Created {
            refund_id: String,
        }

        let body = RefundRequest {
            payment_id: payment_id.as_str().to_owned(),
            amount_cents: amount.cents(),
        };
        let response = self
            .http
            .post(self.url("/refunds"))
            .header(IDEMPOTENCY_KEY_HEADER, idempotency_key.as_str())
            .json(&body)
            .send()
            .await
            .map_err(|error| self.transport_error(&error))?;
        let response = self.successful(response).await?;
        let replayed = response
            .headers()
            .get(REPLAYED_HEADER)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.trim().eq_ignore_ascii_case("true"));
        let created: Created = self.read_json(response).await?;
        if created.refund_id.is_empty() {
            // Without an id we cannot record the refund; the same key will
            // answer the same refund on the retry, so retrying is safe.
            return Err(GatewayError::Transient(
                "gateway answered success without a refund_id".to_owned(),
            ));
        }
        Ok(RefundReceipt {
            refund_id: created.refund_id,
            replayed,
        })
    }

    /// Every refund the gateway made, in creation order (`GET /refunds`); for checkers.
    pub async fn ledger(&self) -> Result<Vec<LedgerEntry>, GatewayError> {
        self.get_json("/refunds").await
    }

    /// The gateway's counters (`GET /stats`); for checkers and the demo summary.
    pub async fn stats(&self) -> Result<GatewayStats, GatewayError> {
        self.get_json("/stats").await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, GatewayError> {
        let response = self
            .http
            .get(self.url(path))
            .send()
            .await
            .map_err(|error| self.transport_error(&error))?;
        let response = self.successful(response).await?;
        self.read_json(response).await
    }

    /// Passes 2xx answers through and turns the others into errors.
    async fn successful(
        &self,
        response: reqwest::Response,
    ) -> Result<reqwest::Response, GatewayError> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        // The status alone decides the kind; an unreadable body only costs detail.
        let body = response.bytes().await.unwrap_or_default();
        let message = cut(format!("gateway answered {status}: {}", error_text(&body)));
        Err(if is_transient_status(status) {
            GatewayError::Transient(message)
        } else {
            GatewayError::Permanent(message)
        })
    }

    async fn read_json<T: DeserializeOwned>(
        &self,
        response: reqwest::Response,
    ) -> Result<T, GatewayError> {
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|error| self.transport_error(&error))?;
        // A success we cannot read may still have happened: retrying with the
        // same idempotency key is safe and will tell us, so it is transient.
        serde_json::from_slice(&body).map_err(|error| {
            GatewayError::Transient(cut(format!(
                "gateway answered {status} with a body we cannot read ({error}): {}",
                String::from_utf8_lossy(&body)
            )))
        })
    }

    /// No answer (or half of one) means we do not know whether the gateway
    /// acted; the idempotency key makes a retry safe, so all of these are transient.
    fn transport_error(&self, error: &reqwest::Error) -> GatewayError {
        let chain = error_chain(error);
        let message = if error.is_timeout() {
            format!("gateway timed out after {:?}: {chain}", self.timeout)
        } else if error.is_connect() {
            format!("gateway unreachable: {chain}")
        } else {
            format!("gateway request failed: {chain}")
        };
        GatewayError::Transient(cut(message))
    }
}

/// 408 and 429 are 4xx that say "later"; anything that is not a 4xx (5xx,
/// or an unexpected 1xx/3xx) leaves the outcome unknown, and retrying is safe.
fn is_transient_status(status: reqwest::StatusCode) -> bool {
    status == reqwest::StatusCode::REQUEST_TIMEOUT
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || !status.is_client_error()
}

/// The gateway's `{"error": "..."}` text, or the raw body when it is not that shape.
fn error_text(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: String,
    }
    if let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) {
        return parsed.error;
    }
    let raw = String::from_utf8_lossy(body).trim().to_owned();
    if raw.is_empty() {
        "(no body)".to_owned()
    } else {
        raw
    }
}

/// reqwest's own message is terse ("error sending request"); the cause is in its sources.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Cuts `text` to at most [`MAX_ERROR_BYTES`] on a character boundary.
fn cut(text: String) -> String {
    const ELLIPSIS: char = '…';
    if text.len() <= MAX_ERROR_BYTES {
        return text;
    }
    let mut short = crate::text::truncate_utf8(&text, MAX_ERROR_BYTES - ELLIPSIS.len_utf8());
    short.push(ELLIPSIS);
    short
}

#[cfg(test)]
mod tests {
    use reqwest::StatusCode;

    use crate::domain::OrderId;

    use super::*;

    #[test]
    fn only_client_errors_other_than_408_and_429_are_permanent() {
        for permanent in [400, 401, 403, 404, 409, 422] {
            let status = StatusCode::from_u16(permanent).ok();
            assert!(
                status.is_some_and(|s| !is_transient_status(s)),
                "{permanent}"
            );
        }
        for transient in [408, 429, 500, 502, 503, 504, 302] {
            let status = StatusCode::from_u16(transient).ok();
            assert!(status.is_some_and(is_transient_status), "{transient}");
        }
    }

    #[test]
    fn error_messages_are_cut_to_one_kib_on_a_character_boundary() {
        let long = "é".repeat(2000);
        let short = cut(long);
        assert!(short.len() <= MAX_ERROR_BYTES, "{}", short.len());
        assert!(short.ends_with('…'));
        assert_eq!(cut("short".to_owned()), "short");
    }

    #[test]
    fn the_gateways_error_text_is_preferred_over_the_raw_body() {
        assert_eq!(
            error_text(br#"{"error":"no such payment"}"#),
            "no such payment"
        );
        assert_eq!(error_text(b"  Bad Gateway \n"), "Bad Gateway");
        assert_eq!(error_text(b""), "(no body)");
    }

    #[test]
    fn a_url_that_does_not_parse_is_refused_at_start() {
        let settings = GatewaySettings {
            url: "http://".to_owned(),
            timeout: Duration::from_secs(1),
        };
        assert!(GatewayClient::new(&settings).is_err());
    }

    /// One refund request of 1.00 for `pay-1` to the gateway at `url`.
    async fn refund_once(
        url: &str,
        timeout: Duration,
    ) -> anyhow::Result<Result<RefundReceipt, GatewayError>> {
        let client = GatewayClient::new(&GatewaySettings {
            url: url.to_owned(),
            timeout,
        })?;
        Ok(client
            .refund(
                &RefundKey::for_order(OrderId::generate()),
                &PaymentId::parse("pay-1")?,
                AmountCents::parse(100)?,
            )
            .await)
    }

    #[tokio::test]
    async fn an_unreachable_gateway_is_a_transient_error() -> anyhow::Result<()> {
        // A port that was just free: nothing listens there any more.
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        drop(listener);
        let result = refund_once(&format!("http://{addr}"), Duration::from_secs(2)).await?;
        let Err(error) = result else {
            panic!("a refund against a closed port succeeded: {result:?}");
        };
        assert!(error.is_transient(), "{error}");
        assert!(error.message().contains("unreachable"), "{error}");
        Ok(())
    }

    #[tokio::test]
    async fn a_gateway_slower_than_the_timeout_is_a_transient_error() -> anyhow::Result<()> {
        // Accepts connections but never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let silent = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let result = refund_once(&format!("http://{addr}/"), Duration::from_millis(200)).await?;
        silent.abort();
        let Err(error) = result else {
            panic!("a refund against a silent gateway succeeded: {result:?}");
        };
        assert!(error.is_transient(), "{error}");
        assert!(error.message().contains("timed out"), "{error}");
        Ok(())
    }
}
