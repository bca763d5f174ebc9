//! The processes under test: courier's real `payment-gateway`, `consumer`
//! and `producer` binaries, and the Celery peer's API and worker, started as
//! children through the demo's launcher (`demo::Children`, `COURIER__*`
//! environment from `demo::child_env`) and stopped with SIGTERM.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::time::Instant;

use super::{env::BenchEnv, procs::Group};
use crate::{
    config::Settings,
    demo::{Children, child_env},
};

const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// A port that was free a moment ago, for a child to listen on.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Waits until `url` answers 2xx, failing early if a child died.
async fn wait_healthy(
    http: &reqwest::Client,
    url: &str,
    children: &mut Children,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        children.check_alive()?;
        if let Ok(response) = http.get(url).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{url} did not answer within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One measured group per named process (`tree`: with its children).
fn process_groups(pids: &BTreeMap<&'static str, i32>, tree: bool) -> Vec<Group> {
    pids.iter()
        .map(|(name, pid)| Group::Process {
            label: (*name).to_owned(),
            pid: *pid,
            tree,
        })
        .collect()
}

fn pid(raw: u32) -> i32 {
    i32::try_from(raw).unwrap_or(0)
}

/// courier's three binaries, the consumer apart so it can be stopped alone.
pub struct Courier {
    pub settings: Settings,
    front: Children,
    consumer: Option<Children>,
    bin_dir: PathBuf,
    log_dir: PathBuf,
    http: reqwest::Client,
    pub pids: BTreeMap<&'static str, i32>,
    pub api_url: String,
    pub stats_url: String,
}

impl Courier {
    /// Starts gateway, consumer and producer on free ports against `env`,
    /// the gateway answering at once and never failing.
    pub async fn start(env: &BenchEnv, bin_dir: &Path, log_dir: &Path) -> anyhow::Result<Self> {
        let mut settings = env.settings.clone();
        settings.producer.listen = free_port()?;
        settings.consumer.stats_listen = free_port()?;
        settings.gateway_simulator.listen = free_port()?;
        settings.gateway.url = format!("http://{}", settings.gateway_simulator.listen);
        settings.gateway_simulator.latency = Duration::ZERO;
        settings.gateway_simulator.transient_error_rate = 0.0;
        settings.gateway_simulator.failing_payment_ids = Vec::new();
        settings.notifications.file_path = log_dir.join("notifications.jsonl");
        let mut courier = Self {
            api_url: format!("http://{}", settings.producer.listen),
            stats_url: format!("http://{}", settings.consumer.stats_listen),
            settings,
            front: Children::new(log_dir)?,
            consumer: None,
            bin_dir: bin_dir.to_owned(),
            log_dir: log_dir.to_owned(),
            http: super::load::http_client()?,
            pids: BTreeMap::new(),
        };
        let env_vars = child_env(&courier.settings);
        let gateway = courier.front.start(bin_dir, "payment-gateway", &env_vars)?;
        courier.pids.insert("payment-gateway", pid(gateway));
        let health = format!("{}/healthz", courier.settings.gateway.url);
        wait_healthy(&courier.http, &health, &mut courier.front).await?;
        courier.start_consumer().await?;
        let producer = courier.front.start(bin_dir, "producer", &env_vars)?;
        courier.pids.insert("producer", pid(producer));
        let health = format!("{}/healthz", courier.api_url);
        wait_healthy(&courier.http, &health, &mut courier.front).await?;
        Ok(courier)
    }

    pub async fn start_consumer(&mut self) -> anyhow::Result<()> {
        let mut children = Children::new(&self.log_dir)?;
        let consumer = children.start(&self.bin_dir, "consumer", &child_env(&self.settings))?;
        self.pids.insert("consumer", pid(consumer));
        let health = format!("{}/healthz", self.stats_url);
        wait_healthy(&self.http, &health, &mut children).await?;
        self.consumer = Some(children);
        Ok(())
    }

    /// SIGTERM to the consumer; `false` if it did not exit 0 in time.
    pub async fn stop_consumer(&mut self) -> bool {
        match self.consumer.take() {
            Some(mut children) => children.stop(STOP_DEADLINE).await.iter().all(|(_, ok)| *ok),
            None => true,
        }
    }

    /// Batches the refunds worker has run so far.
    pub async fn refund_batches(&self) -> anyhow::Result<u64> {
        let stats = crate::demo::consumer_stats(&self.http, &self.stats_url).await?;
        Ok(stats.get("refunds").map_or(0, |s| s.batches))
    }

    /// Refunds and notifications settled so far (handled or dead-lettered),
    /// from the consumer's counters.
    pub async fn settled(&self) -> anyhow::Result<(u64, u64)> {
        let stats = crate::demo::consumer_stats(&self.http, &self.stats_url).await?;
        let done = |worker: &str| {
            stats
                .get(worker)
                .map_or(0, |s| s.handled + s.duplicates + s.dead_total())
        };
        Ok((done("refunds"), done("notifications")))
    }

    /// Statements the producer and the consumer have sent to PostgreSQL so
    /// far, from their `/metrics`.
    pub async fn statements_sent(&self) -> anyhow::Result<u64> {
        let mut sum = 0;
        for base in [&self.api_url, &self.stats_url] {
            let url = format!("{base}/metrics");
            let text = self.http.get(&url).send().await?.text().await?;
            sum +=
                statements_in(&text).ok_or_else(|| anyhow::anyhow!("{url} has no {STATEMENTS}"))?;
        }
        Ok(sum)
    }

    /// Each binary as a measured group.
    pub fn groups(&self) -> Vec<Group> {
        process_groups(&self.pids, false)
    }

    /// Stops everything; the names of the children that did not exit 0.
    pub async fn stop(mut self) -> Vec<String> {
        let mut unclean = Vec::new();
        if !self.stop_consumer().await {
            unclean.push("consumer".to_owned());
        }
        for (name, clean) in self.front.stop(STOP_DEADLINE).await {
            if !clean {
                unclean.push(name);
            }
        }
        unclean
    }
}

const STATEMENTS: &str = "courier_database_statements_total";

/// The statement count in a `/metrics` text.
fn statements_in(metrics: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(STATEMENTS)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The Celery peer: its HTTP API, its worker and its own payment gateway.
pub struct Peer {
    children: Children,
    pub api_url: String,
    pub pids: BTreeMap<&'static str, i32>,
}

impl Peer {
    /// Starts the peer from `peer_dir` (its `run-api` and `run-worker`
    /// scripts) with the virtualenv at `venv`, against `env`.
    pub async fn start(
        env: &BenchEnv,
        bin_dir: &Path,
        peer_dir: &Path,
        venv: &Path,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut settings = env.settings.clone();
        settings.gateway_simulator.listen = free_port()?;
        settings.gateway_simulator.latency = Duration::ZERO;
        settings.gateway_simulator.transient_error_rate = 0.0;
        settings.gateway_simulator.failing_payment_ids = Vec::new();
        let api = free_port()?;
        let http = super::load::http_client()?;
        let mut children = Children::new(log_dir)?;
        let mut pids = BTreeMap::new();
        let gateway = children.start(bin_dir, "payment-gateway", &child_env(&settings))?;
        pids.insert("peer payment-gateway", pid(gateway));
        let gateway_url = format!("http://{}", settings.gateway_simulator.listen);
        wait_healthy(&http, &format!("{gateway_url}/healthz"), &mut children).await?;

        let peer_env: Vec<(String, String)> = [
            ("PEER_VENV", venv.display().to_string()),
            ("PEER_DIR", peer_dir.display().to_string()),
            ("PEER_BROKER_URL", env.amqp_uri()),
            ("PEER_DATABASE_URL", env.database_url()),
            (
                "PEER_GATEWAY",
                settings.gateway_simulator.listen.to_string(),
            ),
            ("PEER_API_PORT", api.port().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let worker = children.start(peer_dir, "run-worker", &peer_env)?;
        pids.insert("peer worker", pid(worker));
        let api_pid = children.start(peer_dir, "run-api", &peer_env)?;
        pids.insert("peer api", pid(api_pid));
        let api_url = format!("http://{api}");
        wait_healthy(&http, &format!("{api_url}/healthz"), &mut children).await?;
        Ok(Self {
            children,
            api_url,
            pids,
        })
    }

    /// Each process tree as a measured group (the worker's pool processes
    /// and the API's forks count with their parent).
    pub fn groups(&self) -> Vec<Group> {
        process_groups(&self.pids, true)
    }

    pub async fn stop(mut self) -> Vec<String> {
        self.children
            .stop(STOP_DEADLINE)
            .await
            .into_iter()
            .filter(|(_, clean)| !clean)
            .map(|(name, _)| name)
            .collect()
    }
}

/// Makes the peer's virtualenv at `venv` from `requirements` (with
/// `python3 -m venv` and pip), unless one made from the same file is there.
pub async fn ensure_venv(venv: &Path, requirements: &Path) -> anyhow::Result<()> {
    let wanted = std::fs::read_to_string(requirements)?;
    let stamp = venv.join("courier-requirements.txt");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str())
        && venv.join("bin/python").exists()
    {
        return Ok(());
    }
    let run = async |program: &Path, args: &[&str]| -> anyhow::Result<()> {
        let output = tokio::process::Command::new(program)
            .args(args)
            .output()
            .await?;
        if !output.status.success() {
            anyhow::bail!(
                "{} {} failed: {}",
                program.display(),
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    };
    let venv_text = venv.display().to_string();
    run(Path::new("python3"), &["-m", "venv", &venv_text]).await?;
    let requirements_text = requirements.display().to_string();
    run(
        &venv.join("bin/pip"),
        &[
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            &requirements_text,
        ],
    )
    .await?;
    std::fs::write(stamp, wanted)?;
    Ok(())
}
