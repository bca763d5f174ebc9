//! The `dead_letter_actions` table: the audit of operators' replays and
//! purges of dead letters. A row is written before the dead copy is acked, so
//! no message leaves a dead-letter queue without a record; a purged message's
//! headers and body stay here.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::{StoreError, schema::dead_letter_actions};

/// What an operator did to one dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Replay,
    Purge,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Replay => "replay",
            Self::Purge => "purge",
        }
    }
}

/// One audit row to write.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = dead_letter_actions)]
pub struct NewAction {
    pub action: &'static str,
    pub queue: String,
    pub target_queue: Option<String>,
    pub message_id: Option<String>,
    pub event_type: Option<String>,
    pub order_id: Option<String>,
    pub error_kind: Option<String>,
    pub last_error: Option<String>,
    pub attempts: Option<i64>,
    pub outcome: String,
    pub operator: String,
    pub headers: serde_json::Value,
    pub body: Vec<u8>,
}

/// An audit row as stored.
#[derive(Debug, Clone, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = dead_letter_actions)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct ActionRow {
    pub id: i64,
    pub action: String,
    pub queue: String,
    pub target_queue: Option<String>,
    pub message_id: Option<String>,
    pub order_id: Option<String>,
    pub error_kind: Option<String>,
    pub outcome: String,
    pub operator: String,
    pub acted_at: DateTime<Utc>,
}

/// Writes one audit row and returns its id.
pub async fn record(conn: &mut AsyncPgConnection, action: &NewAction) -> Result<i64, StoreError> {
    diesel::insert_into(dead_letter_actions::table)
        .values(action)
        .returning(dead_letter_actions::id)
        .get_result(conn)
        .await
        .map_err(StoreError::classify)
}

/// Every action taken on one message, oldest first.
pub async fn for_message(
    conn: &mut AsyncPgConnection,
    message_id: &str,
) -> Result<Vec<ActionRow>, StoreError> {
    dead_letter_actions::table
        .filter(dead_letter_actions::message_id.eq(message_id))
        .order(dead_letter_actions::id)
        .select(ActionRow::as_select())
        .load(conn)
        .await
        .map_err(StoreError::classify)
}
