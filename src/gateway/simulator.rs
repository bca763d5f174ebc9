//! The payment gateway simulator: the HTTP server that stands in for the
//! external payment system in the demo and the tests (`payment-gateway`).
//!
//! It owns the simulated refund ledger, the idempotency-key table and the
//! fault injection: latency, transient failures that are reproducible from a
//! seed, and payment ids that can never be refunded. It serves the wire
//! contract defined in [`super::client`] and must not import the store, the
//! broker or the handlers: it is the outside world, and checkers trust its
//! ledger as ground truth.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use anyhow::Context;
use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::Utc;
use tokio::net::TcpListener;
use uuid::Uuid;

use super::client::{
    GatewayStats, IDEMPOTENCY_KEY_HEADER, LedgerEntry, REPLAYED_HEADER, RefundRequest,
};
use crate::config::{GatewaySimulatorSettings, HttpSettings};

/// Longer keys are refused, as real gateways do; they would only bloat the table.
const MAX_KEY_BYTES: usize = 255;

/// The simulator's routes, with a fresh, empty ledger.
pub fn router(settings: &GatewaySimulatorSettings) -> Router {
    Router::new()
        .route("/refunds", post(create_refund).get(list_refunds))
        .route("/stats", get(stats))
        .route("/healthz", get(healthz))
        .with_state(Arc::new(Simulator::new(settings)))
}

/// Serves the simulator on `listener`, with our HTTP connection limits
/// (`http`), until `shutdown` resolves, then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    settings: &GatewaySimulatorSettings,
    http: &HttpSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    crate::http::serve(listener, router(settings), http, shutdown)
        .await
        .context("the payment gateway simulator stopped serving")
}

struct Simulator {
    latency: Duration,
    faults: Faults,
    books: Mutex<Books>,
}

#[derive(Default)]
struct Books {
    keys: HashMap<String, Arc<tokio::sync::Mutex<KeySlot>>>,
    ledger: Vec<LedgerEntry>,
    stats: GatewayStats,
}

/// One idempotency key's history. Its async lock is held from the
/// "already refunded?" check to the insert, across the latency sleep, so
/// concurrent requests with one key queue up and the later ones replay.
#[derive(Default)]
struct KeySlot {
    /// The first request seen with this key; the key is bound to it.
    request: Option<RefundRequest>,
    refund: Option<LedgerEntry>,
    /// Attempts that reached the failure decision, which is a function of this count.
    attempts: u64,
}

impl Simulator {
    fn new(settings: &GatewaySimulatorSettings) -> Self {
        Self {
            latency: settings.latency,
            faults: Faults {
                seed: settings.seed,
                transient_error_rate: settings.transient_error_rate,
                failing_payment_ids: settings.failing_payment_ids.iter().cloned().collect(),
            },
            books: Mutex::new(Books::default()),
        }
    }

    /// Never held across an await. A panic while holding it cannot leave the
    /// books half-written (each critical section is a single push or
    /// increment), so a poisoned lock is still safe to use.
    fn books(&self) -> MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count(&self, counter: impl FnOnce(&mut GatewayStats)) {
        counter(&mut self.books().stats);
    }

    fn slot(&self, key: &str) -> Arc<tokio::sync::Mutex<KeySlot>> {
        Arc::clone(self.books().keys.entry(key.to_owned()).or_default())
    }

    fn reject(&self, status: StatusCode, message: String) -> Response {
        self.count(|stats| stats.rejected += 1);
        error_response(status, message)
    }
}

async fn create_refund(
    State(sim): State<Arc<Simulator>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    sim.count(|stats| stats.requests += 1);
    let key = match idempotency_key(&headers) {
        Ok(key) => key,
        Err(message) => return sim.reject(StatusCode::BAD_REQUEST, message),
    };
    let request = match parse_request(&body) {
        Ok(request) => request,
        Err((status, message)) => return sim.reject(status, message),
    };

    let slot = sim.slot(&key);
    let mut slot = slot.lock().await;
    match &slot.request {
        Some(bound) if *bound != request => {
            return sim.reject(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "idempotency key {key} was already used for payment {} amount {}; \
                     a key must not be reused for a different refund",
                    bound.payment_id, bound.amount_cents
                ),
            );
        }
        Some(_) => {}
        None => slot.request = Some(request.clone()),
    }
    if let Some(refund) = &slot.refund {
        sim.count(|stats| stats.replayed += 1);
        return (
            StatusCode::OK,
            [(REPLAYED_HEADER, HeaderValue::from_static("true"))],
            Json(refund.clone()),
        )
            .into_response();
    }

    tokio::time::sleep(sim.latency).await;
    let attempt = slot.attempts;
    slot.attempts += 1;
    match sim.faults.decide(&key, &request.payment_id, attempt) {
        Verdict::PermanentFailure => {
            sim.count(|stats| stats.permanent_failures += 1);
            error_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "payment {} cannot be refunded: the payment is disputed \
                     (simulated permanent failure)",
                    request.payment_id
                ),
            )
        }
        Verdict::TransientFailure => {
            sim.count(|stats| stats.transient_failures += 1);
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the payment processor is temporarily unavailable \
                     (simulated transient failure, attempt {} for key {key})",
                    attempt + 1
                ),
            )
        }
        Verdict::Refund => {
            let entry = LedgerEntry {
                refund_id: format!("rf_{}", Uuid::now_v7().simple()),
                payment_id: request.payment_id,
                amount_cents: request.amount_cents,
                idempotency_key: key,
                status: "succeeded".to_owned(),
                created_at: Utc::now(),
            };
            // Slot and ledger change with no await in between, so a client
            // that hangs up cannot leave a refund the key does not know of.
            slot.refund = Some(entry.clone());
            {
                let mut books = sim.books();
                books.ledger.push(entry.clone());
                books.stats.refunds_created += 1;
            }
            (StatusCode::CREATED, Json(entry)).into_response()
        }
    }
}

async fn list_refunds(State(sim): State<Arc<Simulator>>) -> Json<Vec<LedgerEntry>> {
    Json(sim.books().ledger.clone())
}

async fn stats(State(sim): State<Arc<Simulator>>) -> Json<GatewayStats> {
    Json(sim.books().stats.clone())
}

async fn healthz() -> &'static str {
    "ok"
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, String> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY_HEADER) else {
        return Err(
            "missing Idempotency-Key header: every refund needs one, so that a retry \
             cannot refund twice"
                .to_owned(),
        );
    };
    let key = value
        .to_str()
        .map_err(|_| "the Idempotency-Key header must be visible ASCII".to_owned())?
        .trim();
    if key.is_empty() {
        return Err("the Idempotency-Key header is empty".to_owned());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "the Idempotency-Key header is longer than {MAX_KEY_BYTES} bytes"
        ));
    }
    Ok(key.to_owned())
}

/// Syntax errors are 400, well-formed JSON of the wrong shape or with
/// impossible values 422, like the JSON extractor of axum.
fn parse_request(body: &[u8]) -> Result<RefundRequest, (StatusCode, String)> {
    let request: RefundRequest = serde_json::from_slice(body).map_err(|error| {
        let status = if error.is_data() {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        (status, format!("invalid refund request body: {error}"))
    })?;
    if request.payment_id.trim().is_empty() {
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            "payment_id must not be empty".to_owned(),
        ));
    }
    if request.amount_cents <= 0 {
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "amount_cents must be a positive number of cents, got {}",
                request.amount_cents
            ),
        ));
    }
    Ok(request)
}

fn error_response(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// The outcome of one attempt at a new refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Refund,
    TransientFailure,
    PermanentFailure,
}

struct Faults {
    seed: u64,
    transient_error_rate: f64,
    failing_payment_ids: HashSet<String>,
}

impl Faults {
    /// A function of its inputs only: no shared RNG, so a run with the same
    /// seed fails the same attempts whatever order the requests arrive in.
    fn decide(&self, key: &str, payment_id: &str, attempt: u64) -> Verdict {
        if self.failing_payment_ids.contains(payment_id) {
            Verdict::PermanentFailure
        } else if scripted_failures(payment_id).is_some_and(|n| attempt < n)
            || fails_transiently(self.seed, key, attempt, self.transient_error_rate)
        {
            Verdict::TransientFailure
        } else {
            Verdict::Refund
        }
    }
}

/// Like a card processor's test card numbers: a payment id `fail-<N>x-…`
/// fails transiently on its first N attempts and then succeeds, so a test can
/// script exactly how many retries a refund needs.
fn scripted_failures(payment_id: &str) -> Option<u64> {
    let rest = payment_id.strip_prefix("fail-")?;
    let (count, _) = rest.split_once("x-")?;
    count.parse().ok()
}

/// True for about `rate` of all (key, attempt) pairs; 0 never, 1 always.
fn fails_transiently(seed: u64, key: &str, attempt: u64, rate: f64) -> bool {
    uniform(seed, key, attempt) < rate
}

/// A stable hash of the inputs mapped to [0, 1). Hand-written, because std's
/// hashers are not guaranteed to stay the same across Rust releases.
///
/// The key is hashed on its own (FNV-1a, then an avalanche), the attempt is
/// avalanched on its own, and the two are mixed once more. Appending the
/// attempt to the FNV input instead left neighbouring attempts of a few keys
/// correlated: one key drew 0.005, 0.010, 0.001, 0.021 for its first four.
fn uniform(seed: u64, key: &str, attempt: u64) -> f64 {
    const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let fnv = seed
        .to_le_bytes()
        .into_iter()
        .chain(key.bytes())
        .fold(FNV_OFFSET_BASIS, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
        });
    let z = splitmix64(splitmix64(fnv) ^ splitmix64(attempt.wrapping_add(1)));
    // The top 53 bits fill an f64's mantissa exactly: the result is < 1.0.
    (z >> 11) as f64 / (1_u64 << 53) as f64
}

/// splitmix64's finaliser: every input bit flips about half the output bits.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(rate: f64, failing: &[&str]) -> Faults {
        Faults {
            seed: 42,
            transient_error_rate: rate,
            failing_payment_ids: failing.iter().map(|id| (*id).to_owned()).collect(),
        }
    }

    #[test]
    fn a_fail_nx_payment_fails_its_first_n_attempts_only() {
        let faults = faults(0.0, &[]);
        assert_eq!(
            faults.decide("k", "fail-2x-order", 0),
            Verdict::TransientFailure
        );
        assert_eq!(
            faults.decide("k", "fail-2x-order", 1),
            Verdict::TransientFailure
        );
        assert_eq!(faults.decide("k", "fail-2x-order", 2), Verdict::Refund);
        assert_eq!(faults.decide("k", "fail-x-order", 0), Verdict::Refund);
    }

    #[test]
    fn the_same_seed_key_and_attempt_always_give_the_same_verdict() {
        let faults = faults(0.5, &[]);
        for attempt in 0..100 {
            let key = format!("key-{attempt}");
            assert_eq!(
                faults.decide(&key, "pay-1", attempt),
                faults.decide(&key, "pay-1", attempt)
            );
        }
        assert_eq!(uniform(7, "k", 3).to_bits(), uniform(7, "k", 3).to_bits());
    }

    #[test]
    fn another_seed_or_attempt_gives_another_draw() {
        assert_ne!(uniform(1, "k", 0).to_bits(), uniform(2, "k", 0).to_bits());
        assert_ne!(uniform(1, "k", 0).to_bits(), uniform(1, "k", 1).to_bits());
        assert_ne!(uniform(1, "k", 0).to_bits(), uniform(1, "l", 0).to_bits());
    }

    #[test]
    fn rate_zero_never_fails_and_rate_one_always_fails() {
        for attempt in 0..1_000 {
            let key = format!("key-{attempt}");
            assert_eq!(faults(0.0, &[]).decide(&key, "p", attempt), Verdict::Refund);
            assert_eq!(
                faults(1.0, &[]).decide(&key, "p", attempt),
                Verdict::TransientFailure
            );
        }
    }

    #[test]
    fn a_tenth_of_keys_fail_at_rate_one_tenth() {
        let failures = (0..10_000)
            .filter(|n| fails_transiently(42, &format!("{n:08}"), 0, 0.1))
            .count();
        let observed = failures as f64 / 10_000.0;
        assert!((0.08..=0.12).contains(&observed), "{observed}");
    }

    #[test]
    fn retries_of_one_key_fail_independently() {
        let failures = (0..10_000)
            .filter(|attempt| fails_transiently(42, "one-key", *attempt, 0.1))
            .count();
        let observed = failures as f64 / 10_000.0;
        assert!((0.08..=0.12).contains(&observed), "{observed}");
    }
    #[test]
    fn neighbouring_attempts_of_a_key_draw_independently() {
        // The key that drew four low numbers in a row under the old hash.
        let key = "refund-of-order-01a203b1-a68e-711a-99b9-38d53fd8c235";
        let low = (0..4).filter(|a| uniform(42, key, *a) < 0.05).count();
        assert!(low < 4, "{low} of the first four attempts drew under 0.05");
        // Runs of failures across many keys are as rare as independence says:
        // at rate 0.2 about 0.2^3 of keys fail their first three attempts.
        let keys = 20_000;
        let runs = (0..keys)
            .filter(|n| {
                (0..3).all(|a| fails_transiently(42, &format!("refund-of-order-{n:08}"), a, 0.2))
            })
            .count();
        assert!(
            (110..=210).contains(&runs),
            "{runs} of {keys} keys failed three in a row"
        );
    }

    #[test]
    fn a_failing_payment_id_fails_permanently_whatever_the_rate() {
        let faults = faults(1.0, &["pay-doomed"]);
        assert_eq!(
            faults.decide("k", "pay-doomed", 0),
            Verdict::PermanentFailure
        );
        assert_eq!(faults.decide("k", "pay-fine", 0), Verdict::TransientFailure);
    }

    #[test]
    fn requests_without_a_usable_key_or_body_are_refused() {
        assert!(idempotency_key(&HeaderMap::new()).is_err());
        let mut headers = HeaderMap::new();
        headers.insert(IDEMPOTENCY_KEY_HEADER, HeaderValue::from_static("  "));
        assert!(idempotency_key(&headers).is_err());

        let status = |body: &[u8]| parse_request(body).err().map(|(status, _)| status);
        assert_eq!(status(b"{not json"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(
            status(br#"{"payment_id": 5}"#),
            Some(StatusCode::UNPROCESSABLE_ENTITY)
        );
        assert_eq!(
            status(br#"{"payment_id": "p", "amount_cents": 0}"#),
            Some(StatusCode::UNPROCESSABLE_ENTITY)
        );
        assert_eq!(status(br#"{"payment_id": "p", "amount_cents": 10}"#), None);
    }
}

/// The simulator served on a real port and driven through [`GatewayClient`],
/// as the refund handler uses it; no broker or database needed.
#[cfg(test)]
mod served {
    use std::net::SocketAddr;

    use tokio::{sync::oneshot, task::JoinSet};

    use super::*;
    use crate::{
        config::GatewaySettings,
        domain::{AmountCents, OrderId, PaymentId, RefundKey},
        gateway::client::{GatewayClient, GatewayError},
    };

    struct RunningGateway {
        addr: SocketAddr,
        client: GatewayClient,
        stop: oneshot::Sender<()>,
        server: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    impl RunningGateway {
        async fn stop(self) -> anyhow::Result<()> {
            let _ = self.stop.send(());
            self.server.await?
        }
    }

    fn settings() -> GatewaySimulatorSettings {
        GatewaySimulatorSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            latency: Duration::from_millis(20),
            transient_error_rate: 0.0,
            seed: 7,
            failing_payment_ids: Vec::new(),
        }
    }

    fn http_settings() -> HttpSettings {
        HttpSettings {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 64,
        }
    }

    async fn start(settings: GatewaySimulatorSettings) -> anyhow::Result<RunningGateway> {
        let listener = TcpListener::bind(settings.listen).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            serve(listener, &settings, &http_settings(), async {
                let _ = stopped.await;
            })
            .await
        });
        let client = GatewayClient::new(&GatewaySettings {
            url: format!("http://{addr}"),
            timeout: Duration::from_secs(5),
        })?;
        Ok(RunningGateway {
            addr,
            client,
            stop,
            server,
        })
    }

    fn payment(id: &str) -> anyhow::Result<PaymentId> {
        Ok(PaymentId::parse(id)?)
    }

    fn cents(amount: i64) -> anyhow::Result<AmountCents> {
        Ok(AmountCents::parse(amount)?)
    }

    #[tokio::test]
    async fn the_gateway_never_refunds_twice_for_one_key() -> anyhow::Result<()> {
        let gateway = start(settings()).await?;
        let key = RefundKey::for_order(OrderId::generate());
        let mut calls = JoinSet::new();
        for _ in 0..50 {
            let client = gateway.client.clone();
            let key = key.clone();
            let payment_id = payment("pay-1")?;
            let amount = cents(1_250)?;
            calls.spawn(async move { client.refund(&key, &payment_id, amount).await });
        }
        let mut receipts = Vec::new();
        while let Some(joined) = calls.join_next().await {
            receipts.push(joined??);
        }

        let ledger = gateway.client.ledger().await?;
        assert_eq!(ledger.len(), 1, "{ledger:?}");
        assert_eq!(ledger[0].idempotency_key, key.to_string());
        assert_eq!(ledger[0].payment_id, "pay-1");
        assert_eq!(ledger[0].amount_cents, 1_250);
        assert!(
            receipts.iter().all(|r| r.refund_id == ledger[0].refund_id),
            "{receipts:?}"
        );
        assert_eq!(receipts.iter().filter(|r| !r.replayed).count(), 1);
        let stats = gateway.client.stats().await?;
        assert_eq!(
            (stats.requests, stats.refunds_created, stats.replayed),
            (50, 1, 49)
        );
        gateway.stop().await
    }

    #[tokio::test]
    async fn each_key_gets_its_own_refund() -> anyhow::Result<()> {
        let gateway = start(settings()).await?;
        let first = gateway
            .client
            .refund(
                &RefundKey::for_order(OrderId::generate()),
                &payment("pay-1")?,
                cents(100)?,
            )
            .await?;
        let second = gateway
            .client
            .refund(
                &RefundKey::for_order(OrderId::generate()),
                &payment("pay-2")?,
                cents(200)?,
            )
            .await?;
        assert_ne!(first.refund_id, second.refund_id);
        assert!(first.refund_id.starts_with("rf_"), "{}", first.refund_id);
        let ledger = gateway.client.ledger().await?;
        let ids: Vec<&str> = ledger.iter().map(|e| e.refund_id.as_str()).collect();
        assert_eq!(ids, [first.refund_id.as_str(), second.refund_id.as_str()]);
        gateway.stop().await
    }

    #[tokio::test]
    async fn a_failing_payment_id_is_a_permanent_error() -> anyhow::Result<()> {
        let gateway = start(GatewaySimulatorSettings {
            failing_payment_ids: vec!["pay-doomed".to_owned()],
            ..settings()
        })
        .await?;
        let result = gateway
            .client
            .refund(
                &RefundKey::for_order(OrderId::generate()),
                &payment("pay-doomed")?,
                cents(100)?,
            )
            .await;
        let Err(GatewayError::Permanent(message)) = result else {
            panic!("expected a permanent error, got {result:?}");
        };
        assert!(message.contains("422"), "{message}");
        assert!(
            message.contains("pay-doomed cannot be refunded"),
            "{message}"
        );
        assert!(gateway.client.ledger().await?.is_empty());
        assert_eq!(gateway.client.stats().await?.permanent_failures, 1);
        gateway.stop().await
    }

    #[tokio::test]
    async fn transient_errors_are_reported_as_transient() -> anyhow::Result<()> {
        let gateway = start(GatewaySimulatorSettings {
            transient_error_rate: 1.0,
            ..settings()
        })
        .await?;
        let key = RefundKey::for_order(OrderId::generate());
        for _ in 0..3 {
            let result = gateway
                .client
                .refund(&key, &payment("pay-1")?, cents(100)?)
                .await;
            let Err(error @ GatewayError::Transient(_)) = result else {
                panic!("expected a transient error, got {result:?}");
            };
            assert!(error.is_transient());
            assert!(error.message().contains("503"), "{error}");
        }
        assert!(gateway.client.ledger().await?.is_empty());
        assert_eq!(gateway.client.stats().await?.transient_failures, 3);
        gateway.stop().await
    }

    #[tokio::test]
    async fn reusing_a_key_for_another_refund_is_a_permanent_error() -> anyhow::Result<()> {
        let gateway = start(settings()).await?;
        let key = RefundKey::for_order(OrderId::generate());
        gateway
            .client
            .refund(&key, &payment("pay-1")?, cents(100)?)
            .await?;
        let result = gateway
            .client
            .refund(&key, &payment("pay-1")?, cents(999)?)
            .await;
        let Err(GatewayError::Permanent(message)) = result else {
            panic!("expected a permanent error, got {result:?}");
        };
        assert!(message.contains("already used"), "{message}");
        assert_eq!(gateway.client.ledger().await?.len(), 1);
        gateway.stop().await
    }

    #[tokio::test]
    async fn a_refund_without_idempotency_key_is_refused() -> anyhow::Result<()> {
        let gateway = start(settings()).await?;
        let response = reqwest::Client::new()
            .post(format!("http://{}/refunds", gateway.addr))
            .json(&RefundRequest {
                payment_id: "pay-1".to_owned(),
                amount_cents: 100,
            })
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body: serde_json::Value = response.json().await?;
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains("Idempotency-Key"), "{body}");
        assert!(gateway.client.ledger().await?.is_empty());
        gateway.stop().await
    }

    #[tokio::test]
    async fn health_answers_ok_and_shutdown_stops_the_server() -> anyhow::Result<()> {
        let gateway = start(settings()).await?;
        let url = format!("http://{}/healthz", gateway.addr);
        let response = reqwest::get(&url).await?;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.text().await?, "ok");
        gateway.stop().await?;
        assert!(reqwest::get(&url).await.is_err());
        Ok(())
    }
}
