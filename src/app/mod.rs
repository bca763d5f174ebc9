//! `run_until_stopped` for each service: builds the pools and tasks from
//! settings and runs until the injected shutdown future resolves. Binaries
//! are thin wrappers; tests call these directly with their own shutdown.

mod background;
pub mod consumer;
pub mod producer;

use std::{net::SocketAddr, process::ExitCode};

use tokio::net::TcpListener;

use crate::config::Settings;

/// The `main` every service binary shares: tracing, settings (a bad value
/// exits 2 naming its key), the listener at `listen`, then `run` until it
/// returns; a failure is logged and exits 1.
pub async fn main_of<Run, Fut>(
    name: &'static str,
    listen: impl FnOnce(&Settings) -> SocketAddr,
    run: Run,
) -> ExitCode
where
    Run: FnOnce(Settings, TcpListener) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let settings = match Settings::load()
        .and_then(|settings| crate::registry::validate(&settings).map(|()| settings))
    {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("{name}: {error}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init(name, settings.log.format);
    let addr = listen(&settings);
    let result = match TcpListener::bind(addr).await {
        Ok(listener) => run(settings, listener).await,
        Err(error) => Err(anyhow::anyhow!("cannot listen on {addr}: {error}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{name} failed: {error:#}");
            // A configuration error exits 2 whether found at start or by the broker.
            if error.downcast_ref::<crate::config::ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
