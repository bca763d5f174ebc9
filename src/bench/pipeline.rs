//! One run of the whole pipeline, courier's or the peer's: cancel placed
//! orders through the HTTP API, wait until every refund is recorded, and read
//! what it cost. Throughput and latency come from the database's timestamps
//! (see `store::metrics::RefundTiming`), CPU and memory from `/proc`, the
//! transaction and row counts from PostgreSQL's statistics views, and the
//! statements from courier's binaries' own count.

use std::time::Duration;

use tokio::time::Instant;

use super::{
    load::{self, Sent},
    procs::{GroupCost, Monitor},
    sample::Percentiles,
    services::Courier,
};
use crate::{
    domain::OrderId,
    handlers::refund::NAME as REFUNDS,
    store::{
        self, DbPool,
        metrics::{self, DbCounters, RefundTiming},
    },
};

/// How a run learns that its refunds are done.
pub enum Progress<'a> {
    /// courier: the consumer's counters (no query on the measured database).
    Courier(&'a Courier),
    /// The peer: counting refund rows (each poll is subtracted from the counters).
    RefundRows,
}

/// Where a run sends its load and what it watches.
pub struct Target<'a> {
    pub api_url: String,
    pub db: DbPool,
    pub database_url: String,
    /// A URL of the `postgres` database on the same server, for the monitor.
    pub admin_url: String,
    pub groups: Vec<super::procs::Group>,
    pub progress: Progress<'a>,
}

/// How the cancels arrive.
#[derive(Debug, Clone, Copy)]
pub enum Arrivals {
    Closed { clients: usize },
    Open { per_second: f64 },
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct RunFigures {
    pub orders: usize,
    /// Orders from the first cancel to the last refund, per second.
    pub orders_per_second: f64,
    /// Cancel-to-refund latency of every order, ms.
    pub latencies_ms: Vec<f64>,
    pub latency: Percentiles,
    /// Its first part: cancel to the relay's mark after the broker's confirm
    /// (none for the peer, which has no outbox).
    pub relay_latency: Option<Percentiles>,
    /// The cancel requests' own latency.
    pub requests: Option<Percentiles>,
    pub costs: Vec<GroupCost>,
    /// What the database counted during the run.
    pub counters: DbCounters,
    /// Batches the refunds worker ran (0 where there is no courier consumer).
    pub refund_batches: u64,
    /// Statements courier's binaries sent during the run, as they count
    /// them (`store::statements`); `None` for the peer.
    pub statements: Option<u64>,
    /// Every order's timestamps, in the order of its cancel (for
    /// `--timings-dir`).
    pub timings: Vec<RefundTiming>,
}

/// Statements courier's binaries have sent so far (none for the peer,
/// which does not count its own).
async fn statements_sent(target: &Target<'_>) -> anyhow::Result<Option<u64>> {
    match &target.progress {
        Progress::Courier(courier) => courier.statements_sent().await.map(Some),
        Progress::RefundRows => Ok(None),
    }
}

/// Batches the refunds worker has run so far, from its counters.
async fn refund_batches(target: &Target<'_>) -> anyhow::Result<u64> {
    match &target.progress {
        Progress::Courier(courier) => courier.refund_batches().await,
        Progress::RefundRows => Ok(0),
    }
}

async fn settled(
    target: &Target<'_>,
    orders: &[OrderId],
    polls: &mut i64,
) -> anyhow::Result<(u64, u64)> {
    match &target.progress {
        Progress::Courier(courier) => courier.settled().await,
        Progress::RefundRows => {
            *polls += 1;
            let ids: Vec<uuid::Uuid> = orders.iter().map(|id| id.as_uuid()).collect();
            let mut conn = target.db.get().await?;
            let n = metrics::refunded_count(&mut conn, &ids).await?;
            let n = u64::try_from(n).unwrap_or(0);
            Ok((n, n))
        }
    }
}

/// Backends report their counters when idle, at most once a second: reads
/// until two readings a second apart differ only by the reading itself.
/// Returns the counters and how many readings (transactions) it took.
async fn settled_counters(
    conn: &mut diesel_async::AsyncPgConnection,
) -> anyhow::Result<(DbCounters, i64)> {
    let mut last = metrics::counters(conn).await?;
    let mut reads = 1;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let now = metrics::counters(conn).await?;
        reads += 1;
        let quiet = now.since(&last)
            == DbCounters {
                xact_commit: 1,
                ..DbCounters::default()
            }
            || now == last;
        last = now;
        if quiet {
            break;
        }
    }
    Ok((last, reads))
}

/// Places `count` orders (untimed), cancels them as `arrivals` says, waits
/// until every refund (and notification) is settled and measures.
pub async fn run(
    target: &Target<'_>,
    count: usize,
    arrivals: Arrivals,
) -> anyhow::Result<RunFigures> {
    let orders = load::place_orders(&target.db, count, 16).await?;
    load::analyze(&target.db).await?;
    let http = load::http_client()?;
    // Backends report their counters when idle, at most once a second: let
    // the placing settle before the baseline.
    let mut stats_conn = store::connect(&target.database_url).await?;
    let (before, _) = settled_counters(&mut stats_conn).await?;
    let mut polls = 0i64;
    let (base_refunds, base_notified) = settled(target, &orders, &mut polls).await?;
    let base_batches = refund_batches(target).await?;
    let base_statements = statements_sent(target).await?;
    polls = 0;

    let monitor = Monitor::start(
        target.groups.clone(),
        target.admin_url.clone(),
        Duration::from_millis(500),
    )
    .await;
    let sent: Sent = match arrivals {
        Arrivals::Closed { clients } => {
            load::cancel_closed_loop(&http, &target.api_url, &orders, clients).await
        }
        Arrivals::Open { per_second } => {
            load::cancel_open_loop(&http, &target.api_url, &orders, per_second).await
        }
    };
    if sent.failures > 0 {
        let _ = monitor.finish().await;
        anyhow::bail!(
            "{} of {count} cancels failed, e.g. {}",
            sent.failures,
            sent.first_error.unwrap_or_default()
        );
    }
    let timeout = Duration::from_secs(120 + count as u64 / 20);
    let target_count = count as u64;
    let started = Instant::now();
    loop {
        let (refunds, notified) = settled(target, &orders, &mut polls).await?;
        if refunds - base_refunds >= target_count && notified - base_notified >= target_count {
            break;
        }
        if started.elapsed() > timeout {
            let _ = monitor.finish().await;
            anyhow::bail!(
                "only {} refunds and {} notifications of {count} settled within {timeout:?}",
                refunds - base_refunds,
                notified - base_notified
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let costs = monitor.finish().await;
    let batches = refund_batches(target).await? - base_batches;
    let statements = match (statements_sent(target).await?, base_statements) {
        (Some(now), Some(base)) => Some(now - base),
        _ => None,
    };

    let (after, reads) = settled_counters(&mut stats_conn).await?;
    let mut counters = after.since(&before);
    // Our own reads: the counter queries and each progress poll.
    counters.xact_commit -= reads + polls;
    counters.scans -= polls;

    let ids: Vec<uuid::Uuid> = orders.iter().map(|id| id.as_uuid()).collect();
    let mut timings = metrics::refund_timings(&mut stats_conn, REFUNDS, &ids).await?;
    timings.sort_by_key(|t| t.canceled_at);
    if timings.len() != count {
        anyhow::bail!("{} of {count} refunds have a timing", timings.len());
    }
    let first = timings.iter().map(|t| t.canceled_at).min();
    let last = timings.iter().map(|t| t.refunded_at).max();
    let span = match (first, last) {
        (Some(first), Some(last)) => (last - first).as_seconds_f64(),
        _ => f64::NAN,
    };
    let latencies_ms: Vec<f64> = timings
        .iter()
        .map(RefundTiming::cancel_to_refund_ms)
        .collect();
    let latency =
        Percentiles::of(&latencies_ms).ok_or_else(|| anyhow::anyhow!("no latencies measured"))?;
    let relay_ms: Vec<f64> = timings
        .iter()
        .filter_map(RefundTiming::cancel_to_published_ms)
        .collect();
    Ok(RunFigures {
        orders: count,
        orders_per_second: count as f64 / span,
        latencies_ms,
        latency,
        relay_latency: Percentiles::of(&relay_ms),
        requests: Percentiles::of(&sent.request_ms),
        costs,
        counters,
        refund_batches: batches,
        statements,
        timings,
    })
}

/// What one backlog drain measured.
#[derive(Debug, Clone)]
pub struct DrainFigures {
    pub orders: usize,
    /// Refunds per second from the first to the last refund of the drain.
    pub drain_per_second: f64,
    /// The consumer's resident memory: first sample, peak, last sample (KiB).
    pub rss_start_kib: u64,
    pub rss_peak_kib: u64,
    pub rss_end_kib: u64,
}

/// Stops the consumer, cancels `count` orders, waits until the relay has
/// published them all, starts the consumer and measures the drain.
pub async fn backlog(
    courier: &mut Courier,
    db: &DbPool,
    admin_url: &str,
    count: usize,
    clients: usize,
) -> anyhow::Result<DrainFigures> {
    courier.stop_consumer().await;
    let orders = load::place_orders(db, count, 16).await?;
    load::analyze(db).await?;
    let http = load::http_client()?;
    let sent = load::cancel_closed_loop(&http, &courier.api_url, &orders, clients).await;
    if sent.failures > 0 {
        anyhow::bail!("{} backlog cancels failed", sent.failures);
    }
    // The whole backlog is in the broker before the consumer comes back.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut conn = db.get().await?;
        if store::outbox::pending_count(&mut conn).await? == 0 {
            break;
        }
        if Instant::now() >= deadline {
            anyhow::bail!("the relay did not publish the backlog within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    courier.start_consumer().await?;
    let consumer = super::procs::Group::Process {
        label: "consumer".to_owned(),
        pid: courier.pids.get("consumer").copied().unwrap_or(0),
        tree: false,
    };
    let monitor = Monitor::start(
        vec![consumer],
        admin_url.to_owned(),
        Duration::from_millis(250),
    )
    .await;
    let target_count = count as u64;
    let waited = load::wait_for(
        target_count,
        Duration::from_millis(100),
        Duration::from_secs(120 + count as u64 / 20),
        async || {
            let (refunds, notified) = courier.settled().await?;
            Ok(refunds.min(notified))
        },
    )
    .await;
    let costs = monitor.finish().await;
    waited?;

    let ids: Vec<uuid::Uuid> = orders.iter().map(|id| id.as_uuid()).collect();
    let mut conn = db.get().await?;
    let timings = metrics::refund_timings(&mut conn, REFUNDS, &ids).await?;
    let first = timings.iter().map(|t| t.refunded_at).min();
    let last = timings.iter().map(|t| t.refunded_at).max();
    let span = match (first, last) {
        (Some(first), Some(last)) => (last - first).as_seconds_f64(),
        _ => f64::NAN,
    };
    let samples: Vec<u64> = costs
        .first()
        .map(|c| {
            c.rss_samples
                .iter()
                .map(|(_, kib)| *kib)
                .filter(|kib| *kib > 0)
                .collect()
        })
        .unwrap_or_default();
    Ok(DrainFigures {
        orders: count,
        drain_per_second: timings.len() as f64 / span,
        rss_start_kib: samples.first().copied().unwrap_or(0),
        rss_peak_kib: samples.iter().copied().max().unwrap_or(0),
        rss_end_kib: samples.last().copied().unwrap_or(0),
    })
}
