//! The Prometheus text of each service, rendered at scrape time from the
//! counters the relay and the workers keep, plus the outbox's pending rows
//! queried then. Counter names get `_total` from the encoder.

use std::sync::{Arc, atomic::Ordering};

use chrono::Utc;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text::encode},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{
    consume::ConsumerStats,
    domain::Publisher,
    outbox::RelayStats,
    store::{self, DbPool},
};

type Labels = Vec<(&'static str, String)>;

/// A gauge a service reads from its own state at scrape time (the order
/// service: cancels waiting for their batch).
#[derive(Clone)]
pub struct ServiceGauge {
    pub name: &'static str,
    pub help: &'static str,
    pub read: Arc<dyn Fn() -> f64 + Send + Sync>,
}

/// The service's own gauges, each read once per scrape.
#[derive(Debug)]
struct GaugeCollector(Vec<(&'static str, &'static str, f64)>);

impl Collector for GaugeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        for (name, help, value) in &self.0 {
            gauge(&mut encoder, name, help, *value)?;
        }
        Ok(())
    }
}

/// Renders a registry as the text exposition format.
fn render(registry: Registry) -> String {
    let mut text = String::new();
    if let Err(error) = encode(&mut text, &registry) {
        tracing::warn!(%error, "metrics could not be encoded");
    }
    text
}

fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> std::fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// The statements this process sent to PostgreSQL.
#[derive(Debug)]
struct StatementCollector(u64);

impl Collector for StatementCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        counters(
            &mut encoder,
            "courier_database_statements",
            "Statements this process sent to PostgreSQL (BEGIN and COMMIT included).",
            &[(Vec::new(), self.0)],
        )
    }
}

/// What one publisher's outbox looked like at scrape time.
#[derive(Debug)]
struct OutboxNow {
    pending: i64,
    oldest_age_seconds: f64,
}

/// One relay's counters and its publisher's outbox (`None` if the database
/// did not answer).
#[derive(Debug)]
struct RelayNow {
    publisher: Publisher,
    published: u64,
    handed: u64,
    confirmed: u64,
    nacked: u64,
    returned: u64,
    unconfirmed: u64,
    reconnects: u64,
    outbox: Option<OutboxNow>,
}

#[derive(Debug)]
struct RelayCollector(Vec<RelayNow>);

impl Collector for RelayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let e = &mut encoder;
        let per_relay = |value: &dyn Fn(&RelayNow) -> u64| -> Vec<(Labels, u64)> {
            self.0
                .iter()
                .map(|r| {
                    (
                        vec![("publisher", r.publisher.as_str().to_owned())],
                        value(r),
                    )
                })
                .collect()
        };
        for (name, help, value) in [
            (
                "courier_relay_published",
                "Events the relay handed to the broker.",
                &(|r: &RelayNow| r.published) as &dyn Fn(&RelayNow) -> u64,
            ),
            (
                "courier_relay_handed",
                "Events the relay took as its process's writers handed them over after their commit, without a claim query.",
                &|r: &RelayNow| r.handed,
            ),
            (
                "courier_relay_confirmed",
                "Publishes the broker acked without a return (rows marked published).",
                &|r: &RelayNow| r.confirmed,
            ),
            (
                "courier_relay_nacked",
                "Publishes the broker nacked (a queue refused them); they stay pending.",
                &|r: &RelayNow| r.nacked,
            ),
            (
                "courier_relay_returned",
                "Publishes the broker returned as unroutable; they stay pending.",
                &|r: &RelayNow| r.returned,
            ),
            (
                "courier_relay_unconfirmed",
                "Publishes with no answer in time or a broken channel; they stay pending.",
                &|r: &RelayNow| r.unconfirmed,
            ),
            (
                "courier_relay_reconnects",
                "Publisher channels opened again after the first.",
                &|r: &RelayNow| r.reconnects,
            ),
        ] {
            counters(e, name, help, &per_relay(value))?;
        }
        gauge(
            e,
            "courier_database_up",
            "1 if the outbox could be read at this scrape.",
            if self.0.iter().all(|r| r.outbox.is_some()) {
                1.0
            } else {
                0.0
            },
        )?;
        let outboxes: Vec<(&RelayNow, &OutboxNow)> = self
            .0
            .iter()
            .filter_map(|r| r.outbox.as_ref().map(|o| (r, o)))
            .collect();
        if !outboxes.is_empty() {
            let mut pending = e.encode_descriptor(
                "courier_outbox_pending",
                "Events not yet confirmed by the broker.",
                None,
                MetricType::Gauge,
            )?;
            for (relay, outbox) in &outboxes {
                let labels: Labels = vec![("publisher", relay.publisher.as_str().to_owned())];
                ConstGauge::new(outbox.pending as f64).encode(pending.encode_family(&labels)?)?;
            }
            let mut oldest = e.encode_descriptor(
                "courier_outbox_oldest_pending_age_seconds",
                "Age of the oldest pending event (0 when none).",
                None,
                MetricType::Gauge,
            )?;
            for (relay, outbox) in &outboxes {
                let labels: Labels = vec![("publisher", relay.publisher.as_str().to_owned())];
                ConstGauge::new(outbox.oldest_age_seconds)
                    .encode(oldest.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// One publisher's outbox backlog, or `None` if the database did not answer
/// within 3 s.
async fn outbox_now(db: &DbPool, publisher: Publisher) -> Option<OutboxNow> {
    let outbox = async {
        let mut conn = db.get().await.ok()?;
        store::outbox::pending_summary(&mut conn, Some(publisher))
            .await
            .ok()
    };
    let (pending, oldest) = tokio::time::timeout(std::time::Duration::from_secs(3), outbox)
        .await
        .ok()
        .flatten()?;
    Some(OutboxNow {
        pending,
        oldest_age_seconds: oldest.map_or(0.0, |at| {
            (Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0
        }),
    })
}

/// A service's metrics: each of its relays' outcomes with its publisher's
/// outbox backlog, and each of its workers' counters.
pub async fn service(
    relays: &[(Publisher, Arc<RelayStats>)],
    workers: &ConsumerStats,
    gauges: &[ServiceGauge],
    db: &DbPool,
) -> String {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let mut now = Vec::with_capacity(relays.len());
    for (publisher, relay) in relays {
        now.push(RelayNow {
            publisher: *publisher,
            published: get(&relay.published),
            handed: get(&relay.handed),
            confirmed: get(&relay.confirmed),
            nacked: get(&relay.nacked),
            returned: get(&relay.returned),
            unconfirmed: get(&relay.unconfirmed),
            reconnects: relay.reconnects(),
            outbox: outbox_now(db, *publisher).await,
        });
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatementCollector(store::statements::sent())));
    registry.register_collector(Box::new(RelayCollector(now)));
    registry.register_collector(Box::new(ConsumerCollector(workers.clone())));
    registry.register_collector(Box::new(GaugeCollector(
        gauges
            .iter()
            .map(|g| (g.name, g.help, (g.read)()))
            .collect(),
    )));
    render(registry)
}

#[derive(Debug)]
struct ConsumerCollector(ConsumerStats);

impl Collector for ConsumerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let workers: Vec<_> = self.0.workers().collect();
        let per_worker =
            |value: &dyn Fn(&crate::consume::WorkerStats) -> u64| -> Vec<(Labels, u64)> {
                workers
                    .iter()
                    .map(|(name, stats)| (vec![("worker", (*name).clone())], value(stats)))
                    .collect()
            };
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let e = &mut encoder;
        counters(
            e,
            "courier_consumer_consumed",
            "Deliveries taken from the work queue.",
            &per_worker(&|s| get(&s.received)),
        )?;
        counters(
            e,
            "courier_consumer_acked",
            "Deliveries acked once their outcome was durable.",
            &per_worker(&|s| s.acked()),
        )?;
        counters(
            e,
            "courier_consumer_handled",
            "Deliveries whose effect was committed.",
            &per_worker(&|s| get(&s.handled)),
        )?;
        counters(
            e,
            "courier_consumer_duplicates_absorbed",
            "Deliveries the inbox (or the order's refund) showed were done already.",
            &per_worker(&|s| get(&s.duplicates)),
        )?;
        counters(
            e,
            "courier_consumer_requeued",
            "Deliveries handed back to the broker (database down, copy not confirmed).",
            &per_worker(&|s| get(&s.requeued)),
        )?;
        counters(
            e,
            "courier_consumer_reconnects",
            "Consume sessions opened again after an error.",
            &per_worker(&|s| get(&s.reconnects)),
        )?;
        counters(
            e,
            "courier_consumer_batches",
            "Handler batches run.",
            &per_worker(&|s| get(&s.batches)),
        )?;
        let mut retried = Vec::new();
        let mut dead = Vec::new();
        for (name, stats) in &workers {
            let snapshot = stats.snapshot();
            for (queue, n) in snapshot.retried {
                retried.push((vec![("worker", (*name).clone()), ("queue", queue)], n));
            }
            for (reason, n) in snapshot.dead_lettered {
                dead.push((vec![("worker", (*name).clone()), ("reason", reason)], n));
            }
        }
        counters(
            e,
            "courier_consumer_retried",
            "Copies confirmed into a delay tier, by tier queue.",
            &retried,
        )?;
        counters(
            e,
            "courier_consumer_dead_lettered",
            "Copies confirmed into the dead-letter queue, by reason.",
            &dead,
        )?;
        let mut metric = e.encode_descriptor(
            "courier_consumer_handler_duration_seconds",
            "How long the handler took, once per delivery it handled.",
            None,
            MetricType::Histogram,
        )?;
        for (name, stats) in &workers {
            let labels: Labels = vec![("worker", (*name).clone())];
            stats
                .handler_seconds
                .0
                .encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
