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
    /// The broker refused this service's user: a missing grant or a wrong
    /// password, which no retry can fix.
    #[error(
        "broker user `{user}` (amqp.{role}) was refused: {detail}; grant it with `courier broker apply` (scripts/setup.sh runs it) or fix amqp.{role}.user/password"
    )]
    BrokerAccess {
        user: String,
        role: &'static str,
        detail: String,
    },
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
    pub http: HttpSettings,
    #[serde(default)]
    pub log: LogSettings,
}

/// How the binaries log (`[log]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `text` (the default) or `json`: `COURIER__LOG__FORMAT=json`.
    #[serde(default)]
    pub format: crate::telemetry::LogFormat,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub host: String,
    pub port: u16,
    pub user: String,
    #[serde(deserialize_with = "secret")]
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
    pub vhost: String,
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// The management API (users, permissions, the operator's reads).
    pub management_url: String,
    /// One broker user per service, each with the narrowest permissions that
    /// work ([`crate::amqp::permissions`]).
    pub producer: BrokerUser,
    pub consumer: BrokerUser,
    /// Declares the topology, reads dead letters, runs checks.
    pub operator: BrokerUser,
}

/// A broker login.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerUser {
    pub user: String,
    #[serde(deserialize_with = "secret")]
    pub password: SecretString,
}

impl AmqpSettings {
    /// The AMQP URI for `who`, password included: hand it to the client, never to a log.
    pub fn uri_as(&self, who: &BrokerUser) -> String {
        format!(
            "amqp://{}:{}@{}:{}/{}?heartbeat={}",
            percent_encode(&who.user),
            percent_encode(who.password.expose_secret()),
            self.host,
            self.port,
            percent_encode(&self.vhost),
            self.heartbeat.as_secs()
        )
    }

    /// Where the broker is and who connects, for log lines and errors.
    pub fn display_addr_as(&self, who: &BrokerUser) -> String {
        format!(
            "amqp://{}@{}:{}/{}",
            who.user, self.host, self.port, self.vhost
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySettings {
    /// The order service's events, and where those no queue takes go.
    pub events_exchange: String,
    pub unrouted_exchange: String,
    /// The refund context's events, and where those no queue takes go.
    pub refund_events_exchange: String,
    pub refund_unrouted_exchange: String,
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
    /// Relay steps overlapping: while one step waits for its confirms and
    /// marks its rows, the next claims and publishes the rows due since.
    #[serde(default = "default_relay_steps_in_flight")]
    pub steps_in_flight: usize,
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
    /// Cancels that arrived together are written in one statement and one
    /// commit, up to this many (1 writes each on its own).
    #[serde(default = "default_cancel_batch_max")]
    pub cancel_batch_max: usize,
    /// Cancel batches written at once; while they run, the next requests
    /// gather into the next batch.
    #[serde(default = "default_cancel_batches_in_flight")]
    pub cancel_batches_in_flight: usize,
}

fn default_relay_steps_in_flight() -> usize {
    4
}

fn default_cancel_batch_max() -> usize {
    64
}

fn default_cancel_batches_in_flight() -> usize {
    1
}

fn default_consumer_batches_in_flight() -> usize {
    2
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSettings {
    pub workers: Vec<String>,
    pub prefetch: u16,
    pub concurrency: usize,
    pub batch_size: usize,
    /// Batches one worker runs at once; deliveries that arrive meanwhile wait
    /// and form the next batch, so batches grow with the load.
    #[serde(default = "default_consumer_batches_in_flight")]
    pub batches_in_flight: usize,
    /// How long a background worker's batch (registry's
    /// [`Pace::Gathered`](crate::registry::Pace::Gathered)) waits after its
    /// first delivery for more to join it; zero takes only what has arrived.
    #[serde(default, with = "humantime_serde")]
    pub background_linger: Duration,
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

/// How every HTTP server of ours (the order API, the consumer's /stats, the
/// gateway simulator) treats connections, so that slow or idle clients cannot
/// hold them: see [`crate::http::serve`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// The longest a client may take to send a request's head, counted from
    /// the connection's accept or from the end of the previous response.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// The longest a connection may go without a byte read or written while
    /// the server waits on it (a body that stops arriving, a response the
    /// client stops reading).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

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
    ///
    /// Secrets are taken from the environment as they are: figment's `Env`
    /// would read `007` as the number 7 and `true` as a boolean.
    pub fn figment(dir: &std::path::Path, environment: &str) -> Figment {
        let secrets = std::env::vars_os()
            .filter_map(|(key, value)| Some((key.into_string().ok()?, value.into_string().ok()?)));
        Self::figment_with_secrets(dir, environment, secrets)
    }

    /// [`Settings::figment`] with the `COURIER__…PASSWORD` variables given
    /// rather than read from the process environment (tests).
    pub fn figment_with_secrets(
        dir: &std::path::Path,
        environment: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Figment {
        let mut figment = Figment::new()
            .merge(Toml::file_exact(dir.join("default.toml")))
            .merge(Toml::file(dir.join(format!("{environment}.toml"))))
            .merge(
                Env::prefixed(ENV_PREFIX)
                    .filter(|key| !is_secret_key(key.as_str()))
                    .split("__")
                    .lowercase(true),
            );
        for (key, value) in vars {
            if let Some(path) = key.strip_prefix(ENV_PREFIX)
                && is_secret_key(path)
            {
                let path = path
                    .split("__")
                    .collect::<Vec<_>>()
                    .join(".")
                    .to_lowercase();
                figment = figment.merge(figment::providers::Serialized::default(&path, &value));
            }
        }
        figment
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
            let key = error.path.join(".").to_lowercase();
            // A type error's text quotes the value: never for a secret.
            let reason = if is_secret_key(&key) {
                match error.kind {
                    figment::error::Kind::MissingField(_) => "is missing".to_owned(),
                    _ => "is not a valid secret (its value is not shown)".to_owned(),
                }
            } else {
                error.kind.to_string()
            };
            ConfigError::Invalid {
                key,
                reason: format!("{reason}{source}"),
            }
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// What the settings can check alone; which workers exist is the
    /// registry's to check ([`crate::registry::validate`]).
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
        if self.relay.steps_in_flight == 0 {
            return invalid("relay.steps_in_flight", "must be at least 1");
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
        if self.producer.cancel_batch_max == 0 {
            return invalid("producer.cancel_batch_max", "must be at least 1");
        }
        if self.producer.cancel_batches_in_flight == 0 {
            return invalid("producer.cancel_batches_in_flight", "must be at least 1");
        }
        if self.consumer.batch_size == 0 {
            return invalid("consumer.batch_size", "must be at least 1");
        }
        if self.consumer.batches_in_flight == 0 {
            return invalid("consumer.batches_in_flight", "must be at least 1");
        }
        if self.consumer.background_linger >= self.consumer.handler_timeout {
            return invalid(
                "consumer.background_linger",
                "must be shorter than consumer.handler_timeout (a batch waits this long before its handler starts)",
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
        if self.http.header_read_timeout.is_zero() {
            return invalid("http.header_read_timeout", "must be longer than 0");
        }
        if self.http.idle_timeout.is_zero() {
            return invalid("http.idle_timeout", "must be longer than 0");
        }
        if self.http.max_connections == 0 {
            return invalid("http.max_connections", "must be at least 1");
        }
        Ok(())
    }
}

const ENV_PREFIX: &str = "COURIER__";

/// Keys whose values are secrets: taken verbatim, never echoed.
fn is_secret_key(key: &str) -> bool {
    key.to_ascii_lowercase().ends_with("password")
}

/// A secret may be written as any TOML scalar; it is kept as text.
fn secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Integer(i64),
        Unsigned(u64),
        Float(f64),
        Boolean(bool),
    }
    let text = match Scalar::deserialize(d)? {
        Scalar::Text(text) => text,
        Scalar::Integer(n) => n.to_string(),
        Scalar::Unsigned(n) => n.to_string(),
        Scalar::Float(x) => x.to_string(),
        Scalar::Boolean(b) => b.to_string(),
    };
    Ok(SecretString::from(text))
}

fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let raw: Vec<humantime_serde::Serde<Duration>> = Vec::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(humantime_serde::Serde::into_inner)
        .collect())
}

/// Percent-encodes everything but RFC 3986's unreserved characters: for one
/// URI userinfo part or one URL path segment.
pub fn percent_encode(raw: &str) -> String {
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

    /// Asserts that `figment` is refused with an error naming `key`.
    fn assert_refused_naming(figment: Figment, key: &str) {
        let error = Settings::from_figment(figment).err().map(|e| e.to_string());
        assert!(
            error.as_deref().is_some_and(|e| e.contains(key)),
            "{key}: {error:?}"
        );
    }

    #[test]
    fn default_config_is_valid() {
        assert!(Settings::from_figment(defaults()).is_ok());
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let figment = defaults().merge(Serialized::default("database.port", "not-a-port"));
        assert_refused_naming(figment, "database.port");
    }

    #[test]
    fn an_invalid_rate_names_its_key() {
        let figment = defaults().merge(Serialized::default(
            "gateway_simulator.transient_error_rate",
            1.5,
        ));
        assert_refused_naming(figment, "gateway_simulator.transient_error_rate");
    }

    #[test]
    fn zero_http_limits_are_invalid_naming_their_key() {
        let zero = |key: &str, value: figment::value::Value| {
            defaults().merge(Serialized::default(key, value))
        };
        for (key, figment) in [
            (
                "http.header_read_timeout",
                zero("http.header_read_timeout", "0s".into()),
            ),
            ("http.idle_timeout", zero("http.idle_timeout", "0s".into())),
            (
                "http.max_connections",
                zero("http.max_connections", 0.into()),
            ),
        ] {
            assert_refused_naming(figment, key);
        }
    }

    #[test]
    fn zero_batch_and_overlap_settings_are_invalid_naming_their_key() {
        for key in [
            "relay.batch_size",
            "relay.steps_in_flight",
            "producer.cancel_batch_max",
            "producer.cancel_batches_in_flight",
            "consumer.batch_size",
            "consumer.batches_in_flight",
        ] {
            let figment = defaults().merge(Serialized::default(key, 0));
            assert_refused_naming(figment, key);
        }
    }

    #[test]
    fn a_background_linger_as_long_as_the_handler_timeout_is_invalid() {
        let figment = defaults()
            .merge(Serialized::default("consumer.handler_timeout", "30s"))
            .merge(Serialized::default("consumer.background_linger", "30s"));
        assert_refused_naming(figment, "consumer.background_linger");
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
        assert!(
            settings
                .amqp
                .uri_as(&settings.amqp.producer)
                .contains(":5672/courier?")
        );
    }

    fn with_secret(value: &str) -> Result<Settings, ConfigError> {
        Settings::from_figment(Settings::figment_with_secrets(
            &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config"),
            "none",
            [(
                "COURIER__AMQP__CONSUMER__PASSWORD".to_owned(),
                value.to_owned(),
            )],
        ))
    }

    #[test]
    fn a_password_of_any_form_is_taken_verbatim() {
        for password in [
            "8675309123",
            "007",
            "true",
            "1.50",
            "#not-a-comment",
            "\"'q",
            "pässwörd✓",
            "",
        ] {
            let settings = with_secret(password);
            assert_eq!(
                settings
                    .as_ref()
                    .ok()
                    .map(|s| s.amqp.consumer.password.expose_secret().to_owned()),
                Some(password.to_owned()),
                "{password:?}: {:?}",
                settings.err()
            );
        }
    }

    #[test]
    fn a_config_error_about_a_secret_names_the_key_and_never_the_value() {
        let figment = defaults().merge(Serialized::default(
            "database.password",
            vec!["hunter2-in-a-list"],
        ));
        let error = Settings::from_figment(figment)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("database.password"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }
}
