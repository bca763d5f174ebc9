//! The demo's child processes: started with the demo's settings in their
//! environment, stopped with SIGTERM (and SIGKILL after a deadline).

use std::{path::Path, process::Stdio, time::Duration};

use nix::{sys::signal::Signal, unistd::Pid};
use secrecy::ExposeSecret;
use tokio::process::{Child, Command};

use crate::config::Settings;

/// The settings a child must share with the demo, as `COURIER__*` variables,
/// so it runs against the same database, vhost and ports.
pub fn child_env(settings: &Settings) -> Vec<(String, String)> {
    let duration = |d: std::time::Duration| humantime::format_duration(d).to_string();
    // An array of strings, as figment reads it from one environment variable.
    let list = |items: Vec<String>| {
        let quoted: Vec<String> = items.iter().map(|item| format!("\"{item}\"")).collect();
        format!("[{}]", quoted.join(","))
    };
    [
        ("DATABASE__HOST", settings.database.host.clone()),
        ("DATABASE__PORT", settings.database.port.to_string()),
        ("DATABASE__USER", settings.database.user.clone()),
        (
            "DATABASE__PASSWORD",
            settings.database.password.expose_secret().to_owned(),
        ),
        ("DATABASE__NAME", settings.database.name.clone()),
        (
            "DATABASE__POOL_SIZE",
            settings.database.pool_size.to_string(),
        ),
        ("AMQP__HOST", settings.amqp.host.clone()),
        ("AMQP__PORT", settings.amqp.port.to_string()),
        ("AMQP__PRODUCER__USER", settings.amqp.producer.user.clone()),
        (
            "AMQP__PRODUCER__PASSWORD",
            settings.amqp.producer.password.expose_secret().to_owned(),
        ),
        ("AMQP__CONSUMER__USER", settings.amqp.consumer.user.clone()),
        (
            "AMQP__CONSUMER__PASSWORD",
            settings.amqp.consumer.password.expose_secret().to_owned(),
        ),
        ("AMQP__VHOST", settings.amqp.vhost.clone()),
        (
            "TOPOLOGY__RETRY_DELAYS",
            list(
                settings
                    .topology
                    .retry_delays
                    .iter()
                    .copied()
                    .map(duration)
                    .collect(),
            ),
        ),
        (
            "TOPOLOGY__DELIVERY_LIMIT",
            settings.topology.delivery_limit.to_string(),
        ),
        ("PRODUCER__LISTEN", settings.producer.listen.to_string()),
        (
            "CONSUMER__STATS_LISTEN",
            settings.consumer.stats_listen.to_string(),
        ),
        ("CONSUMER__WORKERS", list(settings.consumer.workers.clone())),
        ("CONSUMER__PREFETCH", settings.consumer.prefetch.to_string()),
        (
            "CONSUMER__CONCURRENCY",
            settings.consumer.concurrency.to_string(),
        ),
        (
            "CONSUMER__BATCH_SIZE",
            settings.consumer.batch_size.to_string(),
        ),
        (
            "CONSUMER__MAX_BODY_BYTES",
            settings.consumer.max_body_bytes.to_string(),
        ),
        ("AMQP__HEARTBEAT", duration(settings.amqp.heartbeat)),
        (
            "RELAY__POLL_INTERVAL",
            duration(settings.relay.poll_interval),
        ),
        ("RELAY__BATCH_SIZE", settings.relay.batch_size.to_string()),
        ("RELAY__BACKOFF_BASE", duration(settings.relay.backoff_base)),
        ("RELAY__BACKOFF_MAX", duration(settings.relay.backoff_max)),
        ("SHUTDOWN__DEADLINE", duration(settings.shutdown.deadline)),
        ("GATEWAY__URL", settings.gateway.url.clone()),
        (
            "GATEWAY_SIMULATOR__LISTEN",
            settings.gateway_simulator.listen.to_string(),
        ),
        (
            "GATEWAY_SIMULATOR__TRANSIENT_ERROR_RATE",
            settings.gateway_simulator.transient_error_rate.to_string(),
        ),
        (
            "GATEWAY_SIMULATOR__SEED",
            settings.gateway_simulator.seed.to_string(),
        ),
        (
            "GATEWAY_SIMULATOR__LATENCY",
            duration(settings.gateway_simulator.latency),
        ),
        (
            "GATEWAY_SIMULATOR__FAILING_PAYMENT_IDS",
            list(settings.gateway_simulator.failing_payment_ids.clone()),
        ),
        (
            "NOTIFICATIONS__FILE_PATH",
            settings.notifications.file_path.display().to_string(),
        ),
    ]
    .into_iter()
    .map(|(key, value)| (format!("COURIER__{key}"), value))
    .collect()
}

/// Running children, stopped in reverse start order.
pub struct Children {
    running: Vec<(String, Child)>,
    log_dir: std::path::PathBuf,
}

impl Children {
    pub fn new(log_dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        Ok(Self {
            running: Vec::new(),
            log_dir: log_dir.to_owned(),
        })
    }

    /// Starts `bin_dir/name`, its output appended to `log_dir/name.log`.
    pub fn start(
        &mut self,
        bin_dir: &Path,
        name: &str,
        env: &[(String, String)],
    ) -> anyhow::Result<u32> {
        let log_path = self.log_dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let program = bin_dir.join(name);
        let child = Command::new(&program)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", program.display()))?;
        let pid = child.id().unwrap_or(0);
        self.running.push((name.to_owned(), child));
        Ok(pid)
    }

    /// Fails if a child has already exited (it could not start: see its log).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.running {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "{name} exited early ({status}); see {}",
                    self.log_dir.join(format!("{name}.log")).display()
                );
            }
        }
        Ok(())
    }

    /// SIGTERM to each child, newest first; SIGKILL after `deadline`.
    /// Returns each child's name and whether it exited cleanly.
    pub async fn stop(&mut self, deadline: Duration) -> Vec<(String, bool)> {
        let mut outcomes = Vec::new();
        while let Some((name, mut child)) = self.running.pop() {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let clean = match tokio::time::timeout(deadline, child.wait()).await {
                Ok(Ok(status)) => status.success(),
                _ => {
                    let _ = child.kill().await;
                    false
                }
            };
            outcomes.push((name, clean));
        }
        outcomes
    }
}
