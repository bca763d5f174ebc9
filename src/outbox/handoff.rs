//! Rows a writer of this process just committed, handed straight to the
//! relay that publishes them, so that a step publishes them without first
//! claiming them with a query. Under open-loop arrivals every commit woke a
//! step whose claim found one small batch: a statement, and a round trip to
//! PostgreSQL, on every event's way to the broker (BENCHMARKS.md).
//!
//! The hand-off is a shortcut, never the only way: a row it does not take
//! (it is full, or no relay runs in this process) is claimed by a relay's
//! query as before, and a row handed to a relay that dies with its process
//! is still pending in the outbox for the next one.
//!
//! It also keeps the set of rows that steps hold (handed, or claimed by a
//! query and not yet finished), so that a row is held by one step at a time:
//! a handed row is left out of every claim, and a row a claim took first is
//! not taken by the hand-off.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Mutex, MutexGuard, PoisonError},
};

use tokio::sync::watch;

use super::wake;
use crate::{domain::Publisher, store::outbox::OutboxRow};

/// One relay's hand-off: the rows waiting for its next step, and the rows
/// its steps hold.
pub struct Handoff {
    publisher: Publisher,
    /// The most rows that wait here; beyond it a row is left to the claims.
    capacity: usize,
    state: Mutex<State>,
    /// Bumped whenever rows are handed over.
    handed: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<OutboxRow>,
    /// Ids held by a step or waiting here: left out of every claim.
    held: HashSet<i64>,
}

impl Handoff {
    /// A hand-off for `publisher`'s relay that holds up to `capacity` rows.
    pub fn new(publisher: Publisher, capacity: usize) -> Self {
        Self {
            publisher,
            capacity: capacity.max(1),
            state: Mutex::default(),
            handed: watch::Sender::new(0),
        }
    }

    /// Hands over rows of this publisher that were just committed, in the
    /// order they are to be published. Call it after the commit. A row that
    /// a step already holds is skipped (a claim found it first); rows beyond
    /// the capacity are left to the relay's claims, which are woken for them;
    /// returns how many it left to them.
    pub fn hand(&self, rows: impl IntoIterator<Item = OutboxRow>) -> usize {
        let mut left_over = 0;
        let mut taken = false;
        {
            let mut state = self.lock();
            for row in rows {
                if state.held.contains(&row.id) {
                    continue;
                }
                if state.waiting.len() >= self.capacity {
                    left_over += 1;
                    continue;
                }
                state.held.insert(row.id);
                state.waiting.push_back(row);
                taken = true;
            }
        }
        if taken {
            self.handed
                .send_modify(|count| *count = count.wrapping_add(1));
        }
        if left_over > 0 {
            wake::rows_committed(self.publisher);
        }
        left_over
    }

    /// What the relay waits on for handed rows.
    pub(super) fn subscribe(&self) -> watch::Receiver<u64> {
        self.handed.subscribe()
    }

    /// Whether rows are waiting for a step.
    pub(super) fn has_waiting(&self) -> bool {
        !self.lock().waiting.is_empty()
    }

    /// Up to `max` waiting rows, oldest first, held until `release`.
    pub(super) fn take(&self, max: usize) -> Vec<OutboxRow> {
        let mut state = self.lock();
        let n = max.min(state.waiting.len());
        state.waiting.drain(..n).collect()
    }

    /// The ids no claim may take.
    pub(super) fn held_ids(&self) -> Vec<i64> {
        self.lock().held.iter().copied().collect()
    }

    /// Holds the claimed `rows` that no step holds yet and returns them;
    /// a row handed over or claimed since the claim's query began is dropped.
    pub(super) fn hold(&self, rows: Vec<OutboxRow>) -> Vec<OutboxRow> {
        let mut state = self.lock();
        rows.into_iter()
            .filter(|row| state.held.insert(row.id))
            .collect()
    }

    /// Lets go of rows a step has finished with.
    pub(super) fn release(&self, ids: &[i64]) {
        let mut state = self.lock();
        for id in ids {
            state.held.remove(id);
        }
    }

    /// Every change to the state is whole, so it stays consistent even if a
    /// holder panicked.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use uuid::Uuid;

    use super::*;

    fn row(id: i64) -> OutboxRow {
        OutboxRow {
            id,
            event_id: Uuid::now_v7(),
            event_type: "order.canceled".into(),
            event_version: 1,
            aggregate_type: "order".into(),
            aggregate_id: "o".into(),
            aggregate_version: 2,
            content_type: "application/json".into(),
            payload: serde_json::json!({}),
            correlation_id: None,
            occurred_at: Utc::now(),
            published_at: None,
            attempts: 0,
            last_error: None,
            next_attempt_at: Utc::now(),
        }
    }

    fn ids(rows: &[OutboxRow]) -> Vec<i64> {
        rows.iter().map(|r| r.id).collect()
    }

    #[test]
    fn handed_rows_are_taken_in_the_order_they_were_handed() {
        let handoff = Handoff::new(Publisher::Orders, 10);
        handoff.hand([row(3), row(1)]);
        handoff.hand([row(7)]);
        assert_eq!(ids(&handoff.take(2)), [3, 1]);
        assert_eq!(ids(&handoff.take(5)), [7]);
        assert!(!handoff.has_waiting());
    }

    #[test]
    fn a_handed_row_is_left_out_of_claims_until_released() {
        let handoff = Handoff::new(Publisher::Orders, 10);
        handoff.hand([row(1)]);
        assert_eq!(handoff.held_ids(), [1]);
        assert_eq!(ids(&handoff.hold(vec![row(1), row(2)])), [2]);
        let taken = handoff.take(10);
        handoff.release(&ids(&taken));
        assert_eq!(handoff.held_ids(), [2]);
    }

    #[test]
    fn a_row_a_claim_holds_is_not_handed_again() {
        let handoff = Handoff::new(Publisher::Orders, 10);
        assert_eq!(handoff.hold(vec![row(5)]).len(), 1);
        handoff.hand([row(5), row(6)]);
        assert_eq!(ids(&handoff.take(10)), [6]);
    }

    #[test]
    fn rows_beyond_the_capacity_are_left_to_the_claims() {
        let handoff = Handoff::new(Publisher::Orders, 2);
        let mut woken = wake::subscribe(Publisher::Orders);
        woken.mark_unchanged();
        assert_eq!(handoff.hand([row(1), row(2), row(3)]), 1);
        assert_eq!(ids(&handoff.take(10)), [1, 2]);
        assert!(!handoff.held_ids().contains(&3));
        assert_eq!(woken.has_changed().ok(), Some(true));
    }

    #[test]
    fn handing_rows_over_signals_the_relay() {
        let handoff = Handoff::new(Publisher::Orders, 2);
        let mut handed = handoff.subscribe();
        handoff.hand([row(1)]);
        assert_eq!(handed.has_changed().ok(), Some(true));
        handed.mark_unchanged();
        handoff.hand([row(1)]);
        assert_eq!(handed.has_changed().ok(), Some(false));
    }
}
