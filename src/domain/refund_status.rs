//! What the order service shows of an order's refund, and the rule that
//! makes it converge whatever order the refund context's events arrive in:
//! `refunded` is final; a failure never overwrites it, and a later failure
//! replaces an earlier one's reason.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{RefundCompleted, RefundFailed};

/// An order's refund as the refund context reported it. Orders that were
/// never canceled, or whose refund is still under way, have none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RefundStatus {
    /// The money went back; final.
    Refunded { at: DateTime<Utc> },
    /// The refund was given up on, for `reason`; a person should look. A
    /// replay of the parked request may still refund it later.
    RefundFailed { reason: String, at: DateTime<Utc> },
}

impl RefundStatus {
    pub const REFUNDED: &'static str = "refunded";
    pub const REFUND_FAILED: &'static str = "refund_failed";

    /// The value of `orders.refund_status`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Refunded { .. } => Self::REFUNDED,
            Self::RefundFailed { .. } => Self::REFUND_FAILED,
        }
    }

    pub fn at(&self) -> DateTime<Utc> {
        match self {
            Self::Refunded { at } | Self::RefundFailed { at, .. } => *at,
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Refunded { .. } => None,
            Self::RefundFailed { reason, .. } => Some(reason),
        }
    }

    /// Back from the stored columns; `None` for a status courier never writes.
    pub fn from_parts(status: &str, reason: Option<String>, at: DateTime<Utc>) -> Option<Self> {
        match status {
            Self::REFUNDED => Some(Self::Refunded { at }),
            Self::REFUND_FAILED => Some(Self::RefundFailed {
                reason: reason.unwrap_or_default(),
                at,
            }),
            _ => None,
        }
    }

    pub fn completed(event: &RefundCompleted) -> Self {
        Self::Refunded {
            at: event.occurred_at,
        }
    }

    pub fn failed(event: &RefundFailed) -> Self {
        Self::RefundFailed {
            reason: event.reason.clone(),
            at: event.occurred_at,
        }
    }

    /// What the status becomes when `incoming` arrives on top of `current`;
    /// `None` when it stays as it is. Commutative in effect: any order of
    /// arrival, duplicates included, ends in the same status.
    pub fn converge(current: Option<&Self>, incoming: Self) -> Option<Self> {
        match (current, &incoming) {
            (Some(Self::Refunded { .. }), _) => None,
            (None, _) | (Some(Self::RefundFailed { .. }), Self::Refunded { .. }) => Some(incoming),
            (Some(Self::RefundFailed { at: held, .. }), Self::RefundFailed { at, .. }) => {
                (at > held).then_some(incoming)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    fn failed(reason: &str, seconds: i64) -> RefundStatus {
        RefundStatus::RefundFailed {
            reason: reason.to_owned(),
            at: DateTime::UNIX_EPOCH + Duration::seconds(seconds),
        }
    }

    fn refunded(seconds: i64) -> RefundStatus {
        RefundStatus::Refunded {
            at: DateTime::UNIX_EPOCH + Duration::seconds(seconds),
        }
    }

    /// Applies the events in order, as the order service would.
    fn fold(events: &[RefundStatus]) -> Option<RefundStatus> {
        events.iter().fold(None, |held, incoming| {
            RefundStatus::converge(held.as_ref(), incoming.clone()).or(held)
        })
    }

    #[test]
    fn refunded_is_final_and_a_failure_never_overwrites_it() {
        assert_eq!(fold(&[refunded(1), failed("late", 9)]), Some(refunded(1)));
        assert_eq!(fold(&[failed("first", 1), refunded(2)]), Some(refunded(2)));
        assert_eq!(
            fold(&[refunded(5), refunded(7)]),
            Some(refunded(5)),
            "a duplicate completion changes nothing"
        );
    }

    #[test]
    fn a_later_failure_replaces_an_earlier_ones_reason_in_any_arrival_order() {
        let (early, late) = (failed("503 x4", 1), failed("422", 2));
        assert_eq!(fold(&[early.clone(), late.clone()]), Some(late.clone()));
        assert_eq!(fold(&[late.clone(), early]), Some(late));
    }

    /// Every order of `0..n`.
    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![Vec::new()];
        }
        let mut all = Vec::new();
        for shorter in permutations(n - 1) {
            for at in 0..=shorter.len() {
                let mut order = shorter.clone();
                order.insert(at, n - 1);
                all.push(order);
            }
        }
        all
    }

    #[test]
    fn every_arrival_order_of_the_same_events_ends_in_the_same_status() {
        let events = [failed("a", 1), refunded(3), failed("b", 2), failed("a", 1)];
        let orders = permutations(events.len());
        assert_eq!(orders.len(), 24);
        for order in orders {
            let arrived: Vec<_> = order.iter().map(|i| events[*i].clone()).collect();
            assert_eq!(fold(&arrived), Some(refunded(3)), "{order:?}");
        }
    }

    #[test]
    fn the_stored_columns_read_back_as_the_status() {
        let status = failed("422", 4);
        assert_eq!(
            RefundStatus::from_parts(status.as_str(), Some("422".into()), status.at()),
            Some(status)
        );
        assert_eq!(
            RefundStatus::from_parts("lost", None, DateTime::UNIX_EPOCH),
            None
        );
    }
}
