//! The demo run itself: start, load, wait until settled, check, stop.

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    time::Duration,
};

use futures_util::{StreamExt, stream};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use uuid::Uuid;

use super::{Children, Summary, child_env, summary::DeadLetterSample};
use crate::{check, config::Settings, consume::stats::WorkerSnapshot, store};

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub orders: usize,
    /// Concurrent HTTP requests while creating and canceling orders.
    pub concurrency: usize,
    /// Where the `producer`, `consumer` and `payment-gateway` binaries are.
    pub bin_dir: PathBuf,
    /// Where the children's logs go.
    pub log_dir: PathBuf,
    /// How long to wait for every cancellation to settle.
    pub settle_timeout: Duration,
    pub show_progress: bool,
    /// Management UI base URL, for the summary's link to the queues.
    pub management_url: String,
}

/// Runs the demo and returns its summary; children are stopped on every path.
pub async fn run(settings: &Settings, options: &DemoOptions) -> anyhow::Result<Summary> {
    let mut children = Children::new(&options.log_dir)?;
    let result = drive(settings, options, &mut children).await;
    let stopped = children.stop(settings.shutdown.deadline).await;
    let mut summary = result?;
    summary.clean_exits = stopped;
    Ok(summary)
}

async fn drive(
    settings: &Settings,
    options: &DemoOptions,
    children: &mut Children,
) -> anyhow::Result<Summary> {
    let env = child_env(settings);
    for name in ["payment-gateway", "consumer", "producer"] {
        children.start(&options.bin_dir, name, &env)?;
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let producer_url = format!("http://{}", settings.producer.listen);
    let consumer_url = format!("http://{}", settings.consumer.stats_listen);
    for url in [
        format!("{}/healthz", settings.gateway.url),
        format!("{consumer_url}/healthz"),
        format!("{producer_url}/healthz"),
    ] {
        wait_healthy(&http, &url, children, Duration::from_secs(60)).await?;
    }

    let run_id = Uuid::now_v7().simple().to_string();
    let run_tag = &run_id[run_id.len() - 8..];
    let failing = &settings.gateway_simulator.failing_payment_ids;
    let orders: Vec<(usize, String)> = (0..options.orders)
        .map(|i| {
            // Spread the always-failing payments over the run.
            let step = options.orders / failing.len().max(1) + 1;
            let payment = if i % step == step / 2 && !failing.is_empty() {
                failing[(i / step) % failing.len()].clone()
            } else {
                format!("pay-{run_tag}-{i:05}")
            };
            (i, payment)
        })
        .collect();

    let bar = progress_bar(options, options.orders as u64, "creating orders ");
    let created: Vec<anyhow::Result<Uuid>> = stream::iter(orders.iter().cloned())
        .map(|(i, payment_id)| {
            let http = http.clone();
            let url = format!("{producer_url}/orders");
            let bar = bar.clone();
            async move {
                let body = json!({
                    "payment_id": payment_id,
                    "amount_cents": 500 + (i as i64 % 20) * 125,
                    "customer_email": format!("customer{i}@example.org"),
                });
                let response = http
                    .post(&url)
                    .json(&body)
                    .send()
                    .await?
                    .error_for_status()?;
                let order: serde_json::Value = response.json().await?;
                bar.inc(1);
                order["id"]
                    .as_str()
                    .and_then(|id| Uuid::parse_str(id).ok())
                    .ok_or_else(|| anyhow::anyhow!("POST /orders answered without an id"))
            }
        })
        .buffer_unordered(options.concurrency)
        .collect()
        .await;
    bar.finish();
    let order_ids: Vec<Uuid> = created.into_iter().collect::<anyhow::Result<_>>()?;

    let bar = progress_bar(options, order_ids.len() as u64, "canceling orders");
    let canceled: Vec<anyhow::Result<Uuid>> = stream::iter(order_ids.iter().copied())
        .map(|id| {
            let http = http.clone();
            let url = format!("{producer_url}/orders/{id}/cancel");
            let bar = bar.clone();
            async move {
                let response = http.post(&url).send().await?.error_for_status()?;
                let body: serde_json::Value = response.json().await?;
                bar.inc(1);
                body["event_id"]
                    .as_str()
                    .and_then(|id| Uuid::parse_str(id).ok())
                    .ok_or_else(|| anyhow::anyhow!("cancel answered without an event id"))
            }
        })
        .buffer_unordered(options.concurrency)
        .collect()
        .await;
    bar.finish();
    let event_ids: Vec<Uuid> = canceled.into_iter().collect::<anyhow::Result<_>>()?;

    // Settled: every refund is either in our database or dead-lettered,
    // every notification either sent or dead-lettered, and every canceled
    // order shows what became of its refund.
    let mut db = store::connect(&settings.database.url()).await?;
    let total = event_ids.len() as u64;
    let bar = progress_bar(options, total * 3, "settling        ");
    let deadline = tokio::time::Instant::now() + options.settle_timeout;
    let (refunded, notified, stats) = loop {
        children.check_alive()?;
        let refunded = store::refunds::count_for_orders(&mut db, &order_ids).await?;
        let notified =
            store::inbox::count_among(&mut db, crate::handlers::notification::NAME, &event_ids)
                .await?;
        let statuses = store::orders::count_by_refund_status(&mut db, &order_ids).await?;
        let with_status: i64 = statuses
            .iter()
            .filter(|(status, _)| *status != check::NO_STATUS)
            .map(|(_, n)| n)
            .sum();
        let stats = consumer_stats(&http, &consumer_url).await?;
        let dead = |w: &str| stats.get(w).map_or(0, WorkerSnapshot::dead_total);
        let settled = (refunded as u64 + dead("refunds")).min(total)
            + (notified as u64 + dead("notifications")).min(total)
            + (with_status as u64).min(total);
        bar.set_position(settled);
        let retries: u64 = stats
            .values()
            .flat_map(|s| s.retried.iter().map(|(_, n)| n))
            .sum();
        bar.set_message(format!(
            "refunded {refunded}, notified {notified}, with a refund status {with_status}, retries {retries}, dead {}",
            dead("refunds") + dead("notifications")
        ));
        if settled >= total * 3 || tokio::time::Instant::now() >= deadline {
            break (refunded, notified, stats);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    bar.finish();

    // Ground truth through the same checker the failure-injection tests use:
    // our database first, then the dead letters and the gateway's ledger.
    let scope: HashSet<Uuid> = order_ids.iter().copied().collect();
    let (report, dead_letters) =
        check::gather(&mut db, &settings.amqp, &settings.gateway, Some(&scope)).await?;
    let (samples, earlier) = dead_letter_samples(&dead_letters, &event_ids);

    Ok(Summary {
        orders: event_ids.len(),
        refunded,
        refunds_in_gateway: report.refunds_in_gateway,
        notified,
        doubled: report.doubled.len(),
        without_cancel: report.without_cancel.len(),
        lost: i64::try_from(report.lost.len()).unwrap_or(i64::MAX),
        pending_outbox: report.stuck,
        refund_statuses: report.refund_statuses,
        without_status: report.without_status.len() + report.status_mismatch.len(),
        workers: stats,
        dead_letter_samples: samples,
        earlier_dead_letters: earlier,
        management_url: format!(
            "{}/#/queues/{}",
            options.management_url,
            percent_encode_vhost(&settings.amqp.vhost)
        ),
        operator_user: settings.amqp.operator.user.clone(),
        clean_exits: Vec::new(),
    })
}

fn progress_bar(options: &DemoOptions, len: u64, prefix: &'static str) -> ProgressBar {
    if !options.show_progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len).with_prefix(prefix);
    if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

async fn wait_healthy(
    http: &reqwest::Client,
    url: &str,
    children: &mut Children,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        children.check_alive()?;
        if let Ok(response) = http.get(url).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{url} did not answer within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The consumer's counters, from its `GET /stats`.
pub async fn consumer_stats(
    http: &reqwest::Client,
    consumer_url: &str,
) -> anyhow::Result<BTreeMap<String, WorkerSnapshot>> {
    Ok(http
        .get(format!("{consumer_url}/stats"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// This run's dead letters grouped by kind and (the start of) their error,
/// and how many letters earlier runs left. `refunds.dead` keeps what earlier
/// runs shelved (nothing is ever dropped), so only this run's letters explain
/// this run; the rest is counted apart.
fn dead_letter_samples(
    letters: &[check::DeadLetter],
    this_run: &[Uuid],
) -> (Vec<DeadLetterSample>, usize) {
    let ours: HashSet<String> = this_run.iter().map(Uuid::to_string).collect();
    let mut grouped: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut earlier = 0;
    for letter in letters {
        if !letter
            .message_id
            .as_ref()
            .is_some_and(|id| ours.contains(id))
        {
            earlier += 1;
            continue;
        }
        let error = letter.error.as_deref().unwrap_or("(no x-last-error)");
        let error: String = error.chars().take(100).collect();
        *grouped.entry((letter.kind.clone(), error)).or_default() += 1;
    }
    let samples = grouped
        .into_iter()
        .map(|((kind, error), count)| DeadLetterSample { kind, error, count })
        .collect();
    (samples, earlier)
}

fn percent_encode_vhost(vhost: &str) -> String {
    if vhost == "/" {
        "%2F".to_owned()
    } else {
        vhost.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(id: &Uuid, error: &str) -> check::DeadLetter {
        check::DeadLetter {
            message_id: Some(id.to_string()),
            kind: "permanent".into(),
            error: Some(error.into()),
        }
    }

    #[test]
    fn the_summary_explains_this_runs_dead_letters_and_counts_earlier_ones_apart() {
        let (ours, old) = (Uuid::now_v7(), Uuid::now_v7());
        let letters = [
            letter(&ours, "422"),
            letter(&old, "422"),
            letter(&old, "422"),
            check::DeadLetter {
                message_id: None,
                kind: "poison".into(),
                error: None,
            },
        ];
        let (samples, earlier) = dead_letter_samples(&letters, &[ours]);
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].count, 1, "only this run's letter: {samples:?}");
        assert_eq!(earlier, 3);
    }
}
