//! The pure retry policy: given how often a message failed and how, where it
//! goes next. No broker needed to test it.

use crate::amqp::envelope::ErrorKind;

/// Where a failed message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Into delay tier `tier` (0-based); `attempt` is its new failure count.
    Retry { tier: usize, attempt: i64 },
    /// Into the dead-letter queue with this kind.
    DeadLetter {
        kind: ErrorKind,
        attempt: i64,
        exhausted: bool,
    },
}

/// `previous_failures` is the message's `x-attempt` (0 on first delivery).
/// A transient failure climbs one tier per failure; past the last tier, or at
/// once for a permanent or poison failure, the message is dead-lettered.
pub fn decide(previous_failures: i64, kind: ErrorKind, tiers: usize) -> Decision {
    let attempt = previous_failures.saturating_add(1);
    match kind {
        ErrorKind::Transient => match usize::try_from(previous_failures) {
            Ok(tier) if tier < tiers => Decision::Retry { tier, attempt },
            _ => Decision::DeadLetter {
                kind,
                attempt,
                exhausted: true,
            },
        },
        ErrorKind::Permanent | ErrorKind::Poison => Decision::DeadLetter {
            kind,
            attempt,
            exhausted: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_climb_the_tiers_then_dead_letter() {
        assert_eq!(
            decide(0, ErrorKind::Transient, 3),
            Decision::Retry {
                tier: 0,
                attempt: 1
            }
        );
        assert_eq!(
            decide(1, ErrorKind::Transient, 3),
            Decision::Retry {
                tier: 1,
                attempt: 2
            }
        );
        assert_eq!(
            decide(2, ErrorKind::Transient, 3),
            Decision::Retry {
                tier: 2,
                attempt: 3
            }
        );
        assert_eq!(
            decide(3, ErrorKind::Transient, 3),
            Decision::DeadLetter {
                kind: ErrorKind::Transient,
                attempt: 4,
                exhausted: true
            }
        );
    }

    #[test]
    fn permanent_and_poison_failures_dead_letter_at_once() {
        assert_eq!(
            decide(0, ErrorKind::Permanent, 3),
            Decision::DeadLetter {
                kind: ErrorKind::Permanent,
                attempt: 1,
                exhausted: false
            }
        );
        assert_eq!(
            decide(0, ErrorKind::Poison, 3),
            Decision::DeadLetter {
                kind: ErrorKind::Poison,
                attempt: 1,
                exhausted: false
            }
        );
    }

    #[test]
    fn a_forged_negative_attempt_header_cannot_buy_extra_retries() {
        assert_eq!(
            decide(-5, ErrorKind::Transient, 2),
            Decision::DeadLetter {
                kind: ErrorKind::Transient,
                attempt: -4,
                exhausted: true
            }
        );
    }
}
