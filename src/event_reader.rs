//! A pull reader of the order service's events (`GET /api/events`), the way
//! a system that does not listen to the broker would consume them: it keeps
//! its own offset in its own tables, and each page's effect commits together
//! with the offset that follows it, so a reader killed at any point resumes
//! exactly after the last page it committed: nothing missed, nothing twice.
//!
//! Its effect, for the example, is a copy of what it read. If the events it
//! is behind were pruned, it stops with [`ReadError::Pruned`] rather than
//! skip them: what to do about the hole is its operator's decision.
//! The `pull-consumer` binary runs it.

use std::time::Duration;

use anyhow::Context;

use crate::{
    config::percent_encode,
    http::{EventsPage, MAX_LIMIT},
    shutdown::Shutdown,
    store::{
        DbPool, StoreError,
        event_reader::{self, LoggedEvent},
    },
};

/// Why a step did not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The events after our offset were pruned before we read them.
    #[error(
        "the events after offset {after} were pruned (through {pruned_through}); oldest kept: {oldest:?}. Not skipping them: decide, then reset this reader's offset"
    )]
    Pruned {
        after: String,
        pruned_through: String,
        oldest: Option<String>,
    },
    #[error("event API: {0}")]
    Api(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Applied this many events and moved the offset past them.
    Read(usize),
    /// Nothing new.
    CaughtUp,
}

pub struct EventReader {
    http: reqwest::Client,
    events_url: String,
    name: String,
    db: DbPool,
    page_size: i64,
}

impl EventReader {
    /// A reader called `name` of the API at `api_base_url`, keeping its
    /// offset and its effects in `db` (its tables are created if missing).
    pub async fn new(
        api_base_url: &str,
        name: &str,
        db: DbPool,
        page_size: i64,
    ) -> anyhow::Result<Self> {
        let mut conn = db.get().await.map_err(StoreError::from)?;
        event_reader::ensure_tables(&mut conn).await?;
        drop(conn);
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .context("cannot build the HTTP client")?,
            events_url: format!("{}/api/events", api_base_url.trim_end_matches('/')),
            name: name.to_owned(),
            db,
            page_size: page_size.clamp(1, MAX_LIMIT),
        })
    }

    /// Reads one page after the stored offset and applies it.
    pub async fn step(&self) -> Result<Step, ReadError> {
        let mut conn = self.db.get().await.map_err(StoreError::from)?;
        let after = event_reader::offset(&mut conn, &self.name)
            .await?
            .unwrap_or_else(|| "0.0".to_owned());
        let page = self.fetch(&after).await?;
        if page.events.is_empty() {
            return Ok(Step::CaughtUp);
        }
        let read: Vec<LoggedEvent> = page
            .events
            .iter()
            .map(|e| LoggedEvent {
                event_id: e.event_id,
                position: e.offset.clone(),
                event_type: e.event_type.clone(),
            })
            .collect();
        event_reader::apply(&mut conn, &self.name, &read, &page.next_after).await?;
        Ok(Step::Read(read.len()))
    }

    async fn fetch(&self, after: &str) -> Result<EventsPage, ReadError> {
        let api = |e: reqwest::Error| ReadError::Api(format!("{}: {e}", self.events_url));
        let url = format!(
            "{}?after={}&limit={}",
            self.events_url,
            percent_encode(after),
            self.page_size
        );
        let response = self.http.get(&url).send().await.map_err(api)?;
        let status = response.status();
        if status == reqwest::StatusCode::GONE {
            let body: serde_json::Value = response.json().await.map_err(api)?;
            let text = |key: &str| body[key].as_str().map(str::to_owned);
            return Err(ReadError::Pruned {
                after: after.to_owned(),
                pruned_through: text("pruned_through").unwrap_or_default(),
                oldest: text("oldest_available_offset"),
            });
        }
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(ReadError::Api(format!(
                "{}: {status} {text}",
                self.events_url
            )));
        }
        response.json().await.map_err(api)
    }

    /// Reads until `shutdown`: a page at once while there are more, then
    /// every `poll_interval`. An unreachable API or database is retried; a
    /// pruned offset stops the reader with that error.
    pub async fn run(&self, poll_interval: Duration, shutdown: Shutdown) -> Result<(), ReadError> {
        while !shutdown.is_triggered() {
            match self.step().await {
                Ok(Step::Read(n)) => tracing::info!(reader = %self.name, events = n, "applied"),
                Ok(Step::CaughtUp) => shutdown.sleep(poll_interval).await,
                Err(error @ ReadError::Pruned { .. }) => return Err(error),
                Err(error) => {
                    tracing::warn!(reader = %self.name, %error, "read failed; trying again");
                    shutdown.sleep(poll_interval).await;
                }
            }
        }
        Ok(())
    }
}
