//! Driving work: orders placed straight through the store (untimed set-up),
//! and cancellations sent to the producer's HTTP API by concurrent clients,
//! either closed-loop (each client sends its next request when the last one
//! answered) or open-loop (requests start on a fixed schedule whatever the
//! answers do).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use futures_util::{StreamExt, stream};
use tokio::{task::JoinSet, time::Instant};
use uuid::Uuid;

use crate::{
    domain::{AmountCents, CustomerEmail, Order, OrderId, PaymentId},
    store::{self, DbPool},
};

/// Places `count` orders through `store::orders::insert`, `concurrency` at a time.
pub async fn place_orders(
    db: &DbPool,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<OrderId>> {
    let tag = Uuid::now_v7().simple().to_string();
    let tag = &tag[tag.len() - 8..];
    let placed: Vec<anyhow::Result<OrderId>> = stream::iter(0..count)
        .map(|i| {
            let db = db.clone();
            let payment = format!("pay-{tag}-{i:07}");
            async move {
                let order = Order::place(
                    PaymentId::parse(&payment)?,
                    AmountCents::parse(500 + (i as i64 % 20) * 125)?,
                    CustomerEmail::parse(&format!("customer{i}@example.org"))?,
                    None,
                    Utc::now(),
                );
                let mut conn = db.get().await?;
                store::orders::insert(&mut conn, &order).await?;
                Ok(order.id)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    placed.into_iter().collect()
}

/// Gives the planner statistics of the tables as they are now, before a
/// timed part. A database in service has them (autovacuum keeps them); the
/// bench's is minutes old, and autovacuum's first look (a minute after the
/// tables filled) came in the middle of the timed runs, so every statement
/// ran on plans made for empty tables: hashed seq scans of all refunds for
/// each batch's order lookup, inbox checks walking every row of a consumer.
/// Each repetition was slower than the one before (953 -> 774 -> 469
/// orders/s in one run) and measured the planner's ignorance, not courier.
pub async fn analyze(db: &DbPool) -> anyhow::Result<()> {
    use diesel_async::RunQueryDsl;
    let mut conn = db.get().await?;
    diesel::sql_query("ANALYZE").execute(&mut conn).await?;
    Ok(())
}

/// What the clients saw.
#[derive(Debug, Clone, Default)]
pub struct Sent {
    /// Request latencies of the answered cancels, ms.
    pub request_ms: Vec<f64>,
    pub failures: usize,
    /// The first failure's text, to say why.
    pub first_error: Option<String>,
}

impl Sent {
    fn merge(&mut self, other: Self) {
        self.request_ms.extend(other.request_ms);
        self.failures += other.failures;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

pub fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build()?)
}

async fn cancel_one(http: &reqwest::Client, base_url: &str, id: OrderId) -> Result<f64, String> {
    let started = Instant::now();
    let response = http
        .post(format!("{base_url}/orders/{id}/cancel"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let _ = response.bytes().await;
    if !status.is_success() {
        return Err(format!("cancel answered {status}"));
    }
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

/// Closed loop: `clients` clients cancel `orders` as fast as they are answered.
pub async fn cancel_closed_loop(
    http: &reqwest::Client,
    base_url: &str,
    orders: &[OrderId],
    clients: usize,
) -> Sent {
    let orders: Arc<Vec<OrderId>> = Arc::new(orders.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..clients.max(1) {
        let (http, base_url, orders, next) = (
            http.clone(),
            base_url.to_owned(),
            orders.clone(),
            next.clone(),
        );
        tasks.spawn(async move {
            let mut sent = Sent::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = orders.get(i) else { break };
                record(&mut sent, cancel_one(&http, &base_url, *id).await);
            }
            sent
        });
    }
    let mut all = Sent::default();
    while let Some(done) = tasks.join_next().await {
        if let Ok(sent) = done {
            all.merge(sent);
        }
    }
    all
}

/// Open loop: one cancel every `1 / rate` seconds, each on its own task,
/// whether or not earlier ones were answered.
pub async fn cancel_open_loop(
    http: &reqwest::Client,
    base_url: &str,
    orders: &[OrderId],
    rate_per_second: f64,
) -> Sent {
    let period = Duration::from_secs_f64(1.0 / rate_per_second.max(0.001));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = JoinSet::new();
    for id in orders.iter().copied() {
        ticks.tick().await;
        let (http, base_url) = (http.clone(), base_url.to_owned());
        tasks.spawn(async move { cancel_one(&http, &base_url, id).await });
    }
    let mut all = Sent::default();
    while let Some(done) = tasks.join_next().await {
        if let Ok(result) = done {
            record(&mut all, result);
        }
    }
    all
}

fn record(sent: &mut Sent, result: Result<f64, String>) {
    match result {
        Ok(ms) => sent.request_ms.push(ms),
        Err(error) => {
            sent.failures += 1;
            if sent.first_error.is_none() {
                sent.first_error = Some(error);
            }
        }
    }
}

/// Polls `done()` every `every` until it reaches `target` or `timeout` passes.
pub async fn wait_for<F>(
    target: u64,
    every: Duration,
    timeout: Duration,
    mut done: F,
) -> anyhow::Result<()>
where
    F: AsyncFnMut() -> anyhow::Result<u64>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let now = done().await?;
        if now >= target {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("only {now} of {target} settled within {timeout:?}");
        }
        tokio::time::sleep(every).await;
    }
}
