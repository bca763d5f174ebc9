//! Tracing set-up shared by the binaries: `RUST_LOG` filters (default
//! `info`), and the line format from `log.format`: `text` for people, `json`
//! (one object per line, fields at the top level) for a log pipeline.
//! Every line about a message carries `consumer`, `event_id` and `order_id`.

use serde::Deserialize;
use tracing_subscriber::{EnvFilter, fmt};

/// How log lines are written (`log.format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init(service: &'static str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,tokio_postgres=warn"));
    let builder = fmt().with_env_filter(filter).with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    tracing::debug!(service, "tracing initialised");
}
