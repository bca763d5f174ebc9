//! Tracing set-up shared by the binaries: `RUST_LOG` filters, default `info`.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init(service: &'static str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,tokio_postgres=warn"));
    let _ = fmt().with_env_filter(filter).with_target(false).try_init();
    tracing::debug!(service, "tracing initialised");
}
