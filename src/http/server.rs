//! The one HTTP server loop all our services run (the order API, the
//! consumer's /stats, the gateway simulator): an axum router on hyper's
//! HTTP/1 connections, with the limits `axum::serve` lacks, so that slow, idle
//! or too many clients cannot lock a service out (`[http]` in the settings):
//!
//! - `header_read_timeout` is hyper's own header-read timer. hyper starts it
//!   at accept and again whenever a keep-alive connection goes idle, so it
//!   closes half-open connections and idle keep-alive connections alike.
//! - `idle_timeout` is a read and write timeout on the socket
//!   (`tokio-io-timeout`) for what hyper's timer does not cover: a request
//!   body that stops arriving, a response the client stops reading. hyper
//!   keeps a read pending while a handler runs (to notice a client hanging
//!   up), so it also bounds a handler that runs that long in silence.
//! - `max_connections` is a semaphore: at the cap the loop stops accepting,
//!   and further connections wait in the kernel's listen backlog rather than
//!   each holding a file descriptor here.
//!
//! Accept errors (running out of file descriptors, say) are logged and retried
//! after a short pause; they never end the server. HTTP/1 only: all our
//! clients speak it, and hyper-util's HTTP/1-or-2 detection runs before any of
//! hyper's timers start.
//!
//! This module knows nothing of orders, the store or the broker.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_io_timeout::TimeoutStream;

use crate::config::HttpSettings;

/// The pause after an accept error that is not one connection's own (out of
/// file descriptors, memory or buffers): long enough not to spin while
/// connections close and free them, short enough to resume promptly.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until `shutdown` resolves; then stops
/// accepting, lets requests in flight finish and closes idle connections
/// (every connection is bounded by the timeouts, so this ends).
///
/// Fails only if the connection semaphore breaks, which nothing here does.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: &HttpSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let addr = listener
        .local_addr()
        .context("cannot read the listening address")?;
    let mut connections = http1::Builder::new();
    connections
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout);
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let mut trouble = Trouble::new(addr, settings.max_connections);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);

    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                trouble.cap_reached();
                tokio::select! {
                    permit = permits.clone().acquire_owned() => {
                        permit.context("the connection semaphore was closed")?
                    }
                    () = &mut shutdown => break,
                }
            }
        };
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
            // accept() was not ready: nobody waits in the backlog, so any
            // trouble is over. Then wait for the next connection.
            () = std::future::ready(()) => {
                trouble.backlog_empty();
                tokio::select! {
                    () = &mut shutdown => break,
                    accepted = listener.accept() => accepted,
                }
            }
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // The peer gave up between its handshake and our accept: its
            // business, not a sign of trouble here.
            Err(error) if is_connection_error(&error) => continue,
            Err(error) => {
                trouble.accept_failed(&error);
                drop(permit);
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    () = &mut shutdown => break,
                }
            }
        };

        let mut io = TimeoutStream::new(stream);
        io.set_read_timeout(Some(settings.idle_timeout));
        io.set_write_timeout(Some(settings.idle_timeout));
        let connection = connections.serve_connection(
            TokioIo::new(Box::pin(io)),
            TowerToHyperService::new(router.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(serve_connection(connection, peer, permit));
    }

    drop(listener);
    tracing::debug!(%addr, open = graceful.count(), "stopped accepting; letting open connections finish");
    graceful.shutdown().await;
    Ok(())
}

/// Runs one connection to its end; its permit frees a place under the cap then.
async fn serve_connection(
    connection: impl Future<Output = Result<(), hyper::Error>>,
    peer: std::net::SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    // Timeouts and clients that go away end here; they are routine, and
    // under attack there is one per connection, so they are no warning.
    if let Err(error) = connection.await {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
    drop(permit);
}

fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Trouble accepting, logged once per episode rather than once per
/// connection. An episode starts when the cap is reached or an accept fails,
/// and ends only once nobody is left waiting in the backlog, so a sustained
/// attack is one episode however many waves of connections it sends.
struct Trouble {
    addr: std::net::SocketAddr,
    max_connections: usize,
    at_cap_since: Option<Instant>,
    failed_accepts: u64,
    failing_since: Option<Instant>,
}

impl Trouble {
    fn new(addr: std::net::SocketAddr, max_connections: usize) -> Self {
        Self {
            addr,
            max_connections,
            at_cap_since: None,
            failed_accepts: 0,
            failing_since: None,
        }
    }

    fn cap_reached(&mut self) {
        if self.at_cap_since.is_none() {
            self.at_cap_since = Some(Instant::now());
            tracing::warn!(
                addr = %self.addr,
                max_connections = self.max_connections,
                "connection cap (http.max_connections) reached: not accepting until connections close; new ones wait in the listen backlog"
            );
        }
    }

    fn accept_failed(&mut self, error: &std::io::Error) {
        self.failed_accepts += 1;
        if self.failing_since.is_none() {
            self.failing_since = Some(Instant::now());
            tracing::error!(
                addr = %self.addr,
                %error,
                pause = ?ACCEPT_ERROR_PAUSE,
                "accept failed; retrying after each pause until it succeeds"
            );
        }
    }

    fn backlog_empty(&mut self) {
        if let Some(since) = self.at_cap_since.take() {
            tracing::info!(addr = %self.addr, lasted = ?since.elapsed(), "below the connection cap again, nobody waiting");
        }
        if let Some(since) = self.failing_since.take() {
            tracing::info!(
                addr = %self.addr,
                lasted = ?since.elapsed(),
                failed_accepts = self.failed_accepts,
                "accepting again, nobody waiting"
            );
            self.failed_accepts = 0;
        }
    }
}
