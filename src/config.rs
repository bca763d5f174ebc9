//! Layered configuration: `config/default.toml` < `config/<COURIER_ENV>.toml` <
//! `COURIER__SECTION__KEY` environment variables.
//!
//! Settings are parsed and validated once, at start-up; a bad value stops the
//! binary with the key that is wrong. Passwords are [`SecretString`]s, so they
//! never reach `Debug` output or logs.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// A configuration problem, naming the key that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be read: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration key `{key}` is invalid: {reason}")]
    Invalid { key: String, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub topology: TopologySettings,
    pub relay: RelaySettings,
    pub producer: ProducerSettings,
    pub consumer: ConsumerSettings,
    pub gateway: GatewaySettings,
    pub gateway_simulator: GatewaySimulatorSettings,
    pub notifications: NotificationSettings,
    pub shutdown: ShutdownSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: SecretString,
    pub name: String,
    pub pool_size: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl DatabaseSettings {
    /// The connection URL, password included: hand it to the driver, never to a log.
    pub fn url(&self) -> String {
        self.url_for(&self.name)
    }

    /// The URL of another database on the same server (tests create and drop theirs).
    pub fn url_for(&self, database: &str) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{}?connect_timeout={}",
            percent_encode(&self.user),
            percent_encode(self.password.expose_secret()),
            self.host,
            self.port,
            percent_encode(database),
            self.connect_timeout.as_secs().max(1)
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: SecretString,
    pub vhost: String,
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
}

impl AmqpSettings {
    /// The AMQP URI, password included: hand it to the client, never to a log.
    pub fn uri(&self) -> String {
        format!(
            "amqp://{}:{}@{}:{}/{}?heartbeat={}",
            percent_encode(&self.user),
            percent_encode(self.password.expose_secret()),
            self.host,
            self.port,
            percent_encode(&self.vhost),
            self.heartbeat.as_secs()
        )
    }

    /// Where the broker is, for log lines and errors.
    pub fn display_addr(&self) -> String {
        format!(
            "amqp://{}@{}:{}/{}",
            self.user, self.host, self.port, self.vhost
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySettings {
    pub events_exchange: String,
    pub unrouted_exchange: String,
    pub delivery_limit: u32,
    #[serde(deserialize_with = "durations")]
    pub retry_delays: Vec<Duration>,
    #[serde(default)]
    pub work_queue_max_length: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {
    pub batch_size: i64,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProducerSettings {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSettings {
    pub workers: Vec<String>,
    pub prefetch: u16,
    pub concurrency: usize,
    pub max_body_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Duration,
    pub stats_listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    pub url: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySimulatorSettings {
    pub listen: SocketAddr,
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    pub transient_error_rate: f64,
    pub seed: u64,
    pub failing_payment_ids: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SenderKind {
    File,
    Log,
    Smtp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationSettings {
    pub sender: SenderKind,
    pub file_path: PathBuf,
    pub smtp_host: String,
    pub smtp_port: u16,
    pub from: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

/// The known consumer workers; `consumer.workers` may name only these.
pub const KNOWN_WORKERS: &[&str] = &["refunds", "notifications"];

impl Settings {
    /// Loads the layered configuration from `dir` (usually `./config`) for
    /// `environment`, with `COURIER__*` variables on top, and validates it.
    pub fn load_from(dir: &std::path::Path, environment: &str) -> Result<Self, ConfigError> {
        Self::from_figment(Self::figment(dir, environment))
    }

    /// Loads from `COURIER_CONFIG_DIR` (default `config`) and `COURIER_ENV` (default `local`).
    pub fn load() -> Result<Self, ConfigError> {
        let dir = std::env::var("COURIER_CONFIG_DIR").unwrap_or_else(|_| "config".into());
        let env = std::env::var("COURIER_ENV").unwrap_or_else(|_| "local".into());
        Self::load_from(std::path::Path::new(&dir), &env)
    }

    /// The layered sources, before extraction; tests merge their overrides on top.
    pub fn figment(dir: &std::path::Path, environment: &str) -> Figment {
        Figment::new()
            .merge(Toml::file_exact(dir.join("default.toml")))
            .merge(Toml::file(dir.join(format!("{environment}.toml"))))
            .merge(Env::prefixed("COURIER__").split("__").lowercase(true))
    }

    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let settings: Settings = figment.extract().map_err(|error| {
            if error.path.is_empty() {
                return ConfigError::Load(Box::new(error));
            }
            let source = error
                .metadata
                .as_ref()
                .map(|m| format!(" (from {})", m.name))
                .unwrap_or_default();
            ConfigError::Invalid {
                key: error.path.join(".").to_lowercase(),
                reason: format!("{}{source}", error.kind),
            }
        })?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: &str| {
            Err(ConfigError::Invalid {
                key: key.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if self.database.pool_size == 0 {
            return invalid("database.pool_size", "must be at least 1");
        }
        if self.topology.retry_delays.is_empty() {
            return invalid("topology.retry_delays", "needs at least one delay tier");
        }
        if self.topology.retry_delays.iter().any(Duration::is_zero) {
            return invalid("topology.retry_delays", "a delay must be longer than 0");
        }
        if self.topology.delivery_limit == 0 {
            return invalid("topology.delivery_limit", "must be at least 1");
        }
        if self.relay.batch_size < 1 {
            return invalid("relay.batch_size", "must be at least 1");
        }
        if self.consumer.prefetch == 0 {
            return invalid("consumer.prefetch", "must be at least 1");
        }
        if self.consumer.concurrency == 0 {
            return invalid("consumer.concurrency", "must be at least 1");
        }
        if self.consumer.concurrency > usize::from(self.consumer.prefetch) {
            return invalid(
                "consumer.concurrency",
                "must not exceed consumer.prefetch (extra workers would never get a delivery)",
            );
        }
        if let Some(unknown) = self
            .consumer
            .workers
            .iter()
            .find(|w| !KNOWN_WORKERS.contains(&w.as_str()))
        {
            return invalid(
                "consumer.workers",
                &format!(
                    "unknown worker `{unknown}`; known: {}",
                    KNOWN_WORKERS.join(", ")
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.gateway_simulator.transient_error_rate) {
            return invalid(
                "gateway_simulator.transient_error_rate",
                "must be between 0.0 and 1.0",
            );
        }
        if !self.gateway.url.starts_with("http://") && !self.gateway.url.starts_with("https://") {
            return invalid("gateway.url", "must start with http:// or https://");
        }
        Ok(())
    }
}

fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let raw: Vec<humantime_serde::Serde<Duration>> = Vec::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(humantime_serde::Serde::into_inner)
        .collect())
}

fn percent_encode(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    fn defaults() -> Figment {
        Settings::figment(
            &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config"),
            "none",
        )
    }

    #[test]
    fn default_config_is_valid() {
        assert!(Settings::from_figment(defaults()).is_ok());
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let figment = defaults().merge(Serialized::default("database.port", "not-a-port"));
        let error = Settings::from_figment(figment).err().map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("database.port")),
            "{error:?}"
        );
    }

    #[test]
    fn an_invalid_rate_names_its_key() {
        let figment = defaults().merge(Serialized::default(
            "gateway_simulator.transient_error_rate",
            1.5,
        ));
        let error = Settings::from_figment(figment).err().map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("gateway_simulator.transient_error_rate")),
            "{error:?}"
        );
    }

    #[test]
    fn passwords_never_appear_in_debug_output() {
        let settings = Settings::from_figment(defaults()).ok();
        let debug = format!("{settings:?}");
        assert!(settings.is_some());
        assert!(!debug.contains("courier-local-only"), "{debug}");
    }

    #[test]
    fn vhost_is_percent_encoded_in_the_uri() {
        let Some(settings) = Settings::from_figment(defaults()).ok() else {
            panic!("default settings must load");
        };
        assert!(settings.amqp.uri().contains(":5672/courier?"));
    }
}
