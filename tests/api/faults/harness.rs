//! A failure-injection run: the real `payment-gateway`, `consumer` and
//! `producer` binaries as child processes against this test's vhost and
//! database, orders canceled through the producer's HTTP API, faults injected
//! by the test, dead processes restarted (each restart recorded as proof), and
//! the checker's ground truth at the end.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use courier::{
    check::{self, Report},
    config::Settings,
    consume::stats::WorkerSnapshot,
    demo::child_env,
    gateway::client::{GatewayClient, GatewayStats},
};
use figment::{Figment, providers::Serialized};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::helpers::{TestEnv, consumer_stats_at, free_port};

pub const PRODUCER: &str = "producer";
pub const CONSUMER: &str = "consumer";
pub const GATEWAY: &str = "payment-gateway";

struct Proc {
    child: Child,
    pid: u32,
}

pub struct Run {
    pub env: TestEnv,
    pub settings: Settings,
    http: reqwest::Client,
    log_dir: PathBuf,
    procs: BTreeMap<&'static str, Proc>,
    extra_env: BTreeMap<&'static str, Vec<(String, String)>>,
    /// Every pid each binary ran as, in order: more than one means it was
    /// killed (or died) and restarted.
    pub pids: BTreeMap<&'static str, Vec<u32>>,
    /// Exit statuses of processes that ended, in order.
    pub exits: BTreeMap<&'static str, Vec<ExitStatus>>,
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_producer"))
        .parent()
        .unwrap_or_else(|| panic!("binaries have a directory"))
        .to_owned()
}

impl Run {
    /// A run environment; no process is started yet.
    pub async fn new(configure: impl FnOnce(Figment) -> Figment) -> Self {
        let (producer, consumer, gateway) =
            (free_port().await, free_port().await, free_port().await);
        let env = TestEnv::with(|f| {
            configure(
                f.merge(Serialized::default("producer.listen", &producer))
                    .merge(Serialized::default("consumer.stats_listen", &consumer))
                    .merge(Serialized::default("gateway_simulator.listen", &gateway))
                    .merge(Serialized::default("amqp.heartbeat", "2s")),
            )
        })
        .await;
        let mut settings = env.settings.clone();
        settings.gateway.url = format!("http://{gateway}");
        let log_dir = std::env::temp_dir().join(format!("{}-logs", env.name));
        std::fs::create_dir_all(&log_dir).unwrap_or_else(|e| panic!("{e}"));
        Self {
            env,
            settings,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_else(|e| panic!("{e}")),
            log_dir,
            procs: BTreeMap::new(),
            extra_env: BTreeMap::new(),
            pids: BTreeMap::new(),
            exits: BTreeMap::new(),
        }
    }

    /// Extra environment for one binary (crash points), used from its next start on.
    pub fn set_env(&mut self, name: &'static str, vars: &[(&str, &str)]) {
        self.extra_env.insert(
            name,
            vars.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
    }

    /// Starts gateway, consumer and producer and waits until each answers.
    pub async fn start_all(&mut self) {
        for name in [GATEWAY, CONSUMER, PRODUCER] {
            self.spawn(name).await;
        }
    }

    pub async fn spawn(&mut self, name: &'static str) {
        let log = crate::support::append_log(&self.log_path(name));
        let mut env = child_env(&self.settings);
        env.extend(self.extra_env.get(name).cloned().unwrap_or_default());
        let child = Command::new(bin_dir().join(name))
            .envs(env)
            .env("RUST_LOG", "info,lapin=warn,tokio_postgres=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("{e}")))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let pid = child.id().unwrap_or(0);
        self.pids.entry(name).or_default().push(pid);
        self.procs.insert(name, Proc { child, pid });
        self.wait_healthy(name).await;
    }

    fn health_url(&self, name: &str) -> String {
        match name {
            PRODUCER => format!("http://{}/healthz", self.settings.producer.listen),
            CONSUMER => format!("http://{}/healthz", self.settings.consumer.stats_listen),
            _ => format!("{}/healthz", self.settings.gateway.url),
        }
    }

    async fn wait_healthy(&mut self, name: &'static str) {
        let url = self.health_url(name);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = self.http.get(&url).send().await
                && response.status().is_success()
            {
                return;
            }
            if let Some(proc) = self.procs.get_mut(name)
                && let Ok(Some(status)) = proc.child.try_wait()
            {
                // It died while starting (a crash point can fire at once):
                // the next keep_alive restarts it.
                self.exits.entry(name).or_default().push(status);
                self.procs.remove(name);
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} did not become healthy; log: {}",
                self.log_path(name).display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Restarts every binary that exited; returns how many were restarted.
    pub async fn keep_alive(&mut self) -> usize {
        let mut dead = Vec::new();
        for name in [GATEWAY, CONSUMER, PRODUCER] {
            match self.procs.get_mut(name) {
                None if self.pids.contains_key(name) => dead.push(name),
                Some(proc) => {
                    if let Ok(Some(status)) = proc.child.try_wait() {
                        self.exits.entry(name).or_default().push(status);
                        self.procs.remove(name);
                        dead.push(name);
                    }
                }
                None => {}
            }
        }
        for name in &dead {
            self.spawn(name).await;
        }
        dead.len()
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.get(name).map(|p| p.pid)
    }

    /// How many times `name` was (re)started.
    pub fn starts(&self, name: &str) -> usize {
        self.pids.get(name).map_or(0, Vec::len)
    }

    fn signal(&self, name: &str, signal: Signal) {
        let pid = self
            .pid(name)
            .unwrap_or_else(|| panic!("{name} is not running"));
        nix::sys::signal::kill(Pid::from_raw(i32::try_from(pid).unwrap_or(0)), signal)
            .unwrap_or_else(|e| panic!("signal {signal} to {name}: {e}"));
    }

    /// SIGKILL, and waits until the process is gone.
    pub async fn kill(&mut self, name: &'static str) -> ExitStatus {
        self.signal(name, Signal::SIGKILL);
        self.reap(name, Duration::from_secs(10)).await
    }

    /// SIGTERM, and waits (up to `deadline`) until the process exited.
    pub async fn terminate(&mut self, name: &'static str, deadline: Duration) -> ExitStatus {
        self.signal(name, Signal::SIGTERM);
        self.reap(name, deadline).await
    }

    async fn reap(&mut self, name: &'static str, deadline: Duration) -> ExitStatus {
        let mut proc = self
            .procs
            .remove(name)
            .unwrap_or_else(|| panic!("{name} is not running"));
        let status = tokio::time::timeout(deadline, proc.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{name} did not exit within {deadline:?}"))
            .unwrap_or_else(|e| panic!("{e}"));
        self.exits.entry(name).or_default().push(status);
        status
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }

    /// How many lines of `name`'s logs (all its lives) contain `needle`.
    pub fn log_count(&self, name: &str, needle: &str) -> usize {
        std::fs::read_to_string(self.log_path(name))
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Waits (up to 30 s) until `name` has logged `needle`: the proof that a
    /// fault reached it. Fails with `otherwise` at the deadline.
    pub async fn wait_for_log(&self, name: &str, needle: &str, otherwise: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.log_count(name, needle) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "{otherwise}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates and cancels `n` orders through the producer's API, retrying
    /// requests that hit a producer in the middle of a restart.
    pub async fn cancel_orders(&mut self, n: usize, payment_prefix: &str) -> Vec<Uuid> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let id = self.place_order(payment_prefix, i, "c").await;
            // 409 "already canceled": an earlier try got through before the producer died.
            self.post_retrying(&format!("/orders/{id}/cancel"), None, &[200, 409])
                .await;
            ids.push(id);
        }
        ids
    }

    /// Places `n` orders, then cancels them through `clients` concurrent
    /// requests, so the order service commits them in batches and the
    /// relay and the workers see batches too. A cancel that finds no
    /// producer is sent again once the dead processes are restarted.
    pub async fn cancel_orders_concurrently(
        &mut self,
        n: usize,
        payment_prefix: &str,
        clients: usize,
    ) -> Vec<Uuid> {
        use futures_util::StreamExt;
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            ids.push(self.place_order(payment_prefix, i, "c").await);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut pending = ids.clone();
        while !pending.is_empty() {
            let (http, listen) = (&self.http, self.settings.producer.listen);
            pending = futures_util::stream::iter(pending)
                .map(|id| async move {
                    let path = format!("/orders/{id}/cancel");
                    // 409 "already canceled": an earlier try got through
                    // before the producer died.
                    let sent = send_once(
                        http,
                        listen,
                        reqwest::Method::POST,
                        &path,
                        None,
                        &[200, 409],
                        deadline,
                    );
                    sent.await.err().map(|()| id)
                })
                .buffer_unordered(clients)
                .filter_map(std::future::ready)
                .collect()
                .await;
            if !pending.is_empty() {
                self.keep_alive().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        ids
    }

    /// Places the `i`-th order of `payment_prefix` (its customer
    /// `<email_prefix><i>@example.org`) through the producer's API.
    async fn place_order(&mut self, payment_prefix: &str, i: usize, email_prefix: &str) -> Uuid {
        let body = serde_json::json!({
            "payment_id": format!("{payment_prefix}-{i}"),
            "amount_cents": 100 + i,
            "customer_email": format!("{email_prefix}{i}@example.org"),
        });
        let order = self.post_retrying("/orders", Some(&body), &[201]).await;
        order["id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .unwrap_or_else(|| panic!("{order}"))
    }

    /// Places `n` orders through the producer's API and changes each one's
    /// shipping address `changes` times (each change a new address, so each
    /// raises an event); returns the order ids.
    pub async fn change_addresses(&mut self, n: usize, changes: usize, prefix: &str) -> Vec<Uuid> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let id = self.place_order(prefix, i, "s").await;
            for change in 1..=changes {
                let address = serde_json::json!({
                    "shipping_address": format!("{change} {prefix} Street\nOrder {i}"),
                });
                self.send_retrying(
                    reqwest::Method::PUT,
                    &format!("/orders/{id}/shipping-info"),
                    Some(&address),
                    &[200],
                )
                .await;
            }
            ids.push(id);
        }
        ids
    }

    pub async fn post_retrying(
        &mut self,
        path: &str,
        body: Option<&serde_json::Value>,
        ok: &[u16],
    ) -> serde_json::Value {
        self.send_retrying(reqwest::Method::POST, path, body, ok)
            .await
    }

    /// Sends a request to the producer's API, retrying while the producer
    /// is in the middle of a restart.
    async fn send_retrying(
        &mut self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
        ok: &[u16],
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let listen = self.settings.producer.listen;
            match send_once(&self.http, listen, method.clone(), path, body, ok, deadline).await {
                Ok(answer) => return answer,
                Err(()) => {
                    self.keep_alive().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Publishes every order event in the outbox once more, straight to the
    /// order events exchange from the test's own connection: duplicates on
    /// the wire.
    pub async fn republish_all_events(&self) {
        use courier::store::schema::outbox;
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        let rows = {
            let mut conn = self.env.conn().await;
            outbox::table
                .filter(outbox::publisher.eq(courier::domain::Publisher::Orders.as_str()))
                .order(outbox::id)
                .select(courier::store::outbox::OutboxRow::as_select())
                .load(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        };
        for row in &rows {
            self.env
                .publisher
                .publish(
                    &self.settings.topology.events_exchange,
                    &row.event_type,
                    row.payload.to_string().as_bytes(),
                    courier::amqp::envelope::properties_for(row, "test"),
                    Duration::from_secs(5),
                )
                .await
                .unwrap_or_else(|e| panic!("republishing {}: {e}", row.event_id));
        }
    }

    /// Every quorum queue of the topology, by name.
    pub fn quorum_queue_names(&self) -> Vec<String> {
        let mut queues: Vec<String> = self
            .env
            .topology
            .workers
            .iter()
            .flat_map(|w| {
                let mut names = vec![w.work().to_owned(), w.dead()];
                names.extend(w.retry_queues());
                names
            })
            .collect();
        queues.push(self.settings.topology.unrouted_exchange.clone());
        queues.push(self.settings.topology.refund_unrouted_exchange.clone());
        queues
    }

    /// Waits until at least `n` refunds are committed (the consumer is busy).
    pub async fn wait_until_refunded(&self, n: i64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.env.count("SELECT count(*) FROM refunds").await < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the consumer never got busy"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The checker's report now. The test's own broker and database
    /// settings, never the proxy the binaries may be going through.
    pub async fn check(&self, scope: &HashSet<Uuid>) -> Report {
        let mut conn = self.env.conn().await;
        check::gather(
            &mut conn,
            &self.env.settings.amqp,
            &self.settings.gateway,
            Some(scope),
        )
        .await
        .map(|(report, _)| report)
        .unwrap_or_else(|e| panic!("checker: {e:#}"))
    }

    /// Keeps restarting dead binaries until the run has settled, or `timeout`
    /// passes; returns the final report (the test asserts on it). Settled:
    /// every order in `scope` is refunded or dead-lettered, nothing is
    /// pending, every canceled order shows what became of its refund (the
    /// refund context's event made it back to the order service), and the
    /// shipping read model holds every order's newest address.
    pub async fn settle(&mut self, scope: &HashSet<Uuid>, timeout: Duration) -> Report {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.keep_alive().await;
            let report = self.check(scope).await;
            let settled = report.lost.is_empty()
                && report.stuck == 0
                && report.without_status.is_empty()
                && report.status_mismatch.is_empty()
                && report.unconverged.is_empty();
            if settled || tokio::time::Instant::now() >= deadline {
                return report;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn gateway_stats(&self) -> GatewayStats {
        GatewayClient::new(&self.settings.gateway)
            .unwrap_or_else(|e| panic!("{e}"))
            .stats()
            .await
            .unwrap_or_else(|e| panic!("gateway stats: {e}"))
    }

    pub async fn consumer_stats(&self) -> BTreeMap<String, WorkerSnapshot> {
        consumer_stats_at(self.settings.consumer.stats_listen).await
    }

    /// Stops every binary with SIGTERM; returns whether each exited 0.
    pub async fn stop_all(&mut self) -> BTreeMap<&'static str, bool> {
        let mut clean = BTreeMap::new();
        for name in [PRODUCER, CONSUMER, GATEWAY] {
            if self.procs.contains_key(name) {
                let status = self.terminate(name, Duration::from_secs(30)).await;
                clean.insert(name, status.success());
            }
        }
        clean
    }
}

/// Sends one request to the producer's API at `listen`: its JSON answer
/// (null when it has none) if the status is one of `ok`, `Err` if the
/// producer could not be reached (it may be restarting) before `deadline`.
/// Any other status fails the test.
async fn send_once(
    http: &reqwest::Client,
    listen: std::net::SocketAddr,
    method: reqwest::Method,
    path: &str,
    body: Option<&serde_json::Value>,
    ok: &[u16],
    deadline: tokio::time::Instant,
) -> Result<serde_json::Value, ()> {
    let mut request = http.request(method.clone(), format!("http://{listen}{path}"));
    if let Some(body) = body {
        request = request.json(body);
    }
    match request.send().await {
        Ok(response) if ok.contains(&response.status().as_u16()) => {
            Ok(response.json().await.unwrap_or(serde_json::Value::Null))
        }
        Ok(response) => panic!(
            "{method} {path}: {} {}",
            response.status(),
            response.text().await.unwrap_or_default()
        ),
        Err(error) => {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{method} {path} kept failing: {error}"
            );
            Err(())
        }
    }
}

/// Asserts the run's verdict and prints the checker's table.
pub fn assert_passed(report: &Report, what: &str) {
    println!(
        "{what}: canceled {}, refunded {}, in gateway {}, dead {:?}, lost {}, doubled {}, without cancel {}, stuck {}, refunded but shelved {}, refund statuses {:?}, without status {}, status mismatch {}, shipping changed {}, unconverged {}",
        report.canceled,
        report.refunded,
        report.refunds_in_gateway,
        report.dead_lettered,
        report.lost.len(),
        report.doubled.len(),
        report.without_cancel.len(),
        report.stuck,
        report.refunded_but_shelved.len(),
        report.refund_statuses,
        report.without_status.len(),
        report.status_mismatch.len(),
        report.shipping_changed,
        report.unconverged.len()
    );
    assert!(report.lost.is_empty(), "{what}: lost {:?}", report.lost);
    assert!(
        report.doubled.is_empty(),
        "{what}: doubled {:?}",
        report.doubled
    );
    assert!(
        report.without_cancel.is_empty(),
        "{what}: refunded for no canceled order {:?}",
        report.without_cancel
    );
    assert_eq!(report.stuck, 0, "{what}: stuck in the outbox");
    assert!(
        report.without_status.is_empty(),
        "{what}: canceled orders without a refund status {:?}",
        report.without_status
    );
    assert!(
        report.status_mismatch.is_empty(),
        "{what}: refund status disagrees with the refund {:?}",
        report.status_mismatch
    );
    assert!(
        report.unconverged.is_empty(),
        "{what}: shipping read model not converged {:?}",
        report.unconverged
    );
}
