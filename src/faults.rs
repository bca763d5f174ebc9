//! Crash points for failure-injection tests: a process started with
//! `COURIER_CRASH_AT=<point>` aborts (as abruptly as a SIGKILL: no acks, no
//! commits, no cleanup) right after the named step, the
//! `COURIER_CRASH_AFTER`-th time it reaches it (default 1). Without the
//! variable every crash point is a no-op; no other code path depends on it.
//! `COURIER_CRASH_ON_MESSAGE=<message id>` makes every delivery of that one
//! message crash the consumer.

use std::sync::{
    OnceLock,
    atomic::{AtomicU64, Ordering},
};

/// The named steps after which a test can make the process die.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Consumer: the gateway refunded, nothing is committed yet.
    AfterGatewayCall,
    /// Consumer: effect + inbox committed, the delivery is not acked yet.
    AfterCommit,
    /// Consumer: a batch of several deliveries committed together, none of
    /// them acked yet.
    AfterBatchCommit,
    /// Consumer: a delivery was decoded, before its effect.
    BeforeEffect,
    /// Relay: the batch was handed to the broker, no confirm awaited yet.
    AfterPublishBeforeConfirm,
    /// Relay: some of a batch's confirms arrived, others are outstanding.
    MidConfirms,
    /// Relay: the broker confirmed, the rows are not marked yet.
    AfterConfirmBeforeMark,
    /// Order service: a batch of cancels committed, none of its requests
    /// answered yet.
    AfterCancelBatchCommit,
}

impl CrashPoint {
    pub const ALL: [CrashPoint; 8] = [
        Self::AfterGatewayCall,
        Self::AfterCommit,
        Self::AfterBatchCommit,
        Self::BeforeEffect,
        Self::AfterPublishBeforeConfirm,
        Self::MidConfirms,
        Self::AfterConfirmBeforeMark,
        Self::AfterCancelBatchCommit,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Self::AfterGatewayCall => "after-gateway-call",
            Self::AfterCommit => "after-commit",
            Self::AfterBatchCommit => "after-batch-commit",
            Self::BeforeEffect => "before-effect",
            Self::AfterPublishBeforeConfirm => "after-publish-before-confirm",
            Self::MidConfirms => "mid-confirms",
            Self::AfterConfirmBeforeMark => "after-confirm-before-mark",
            Self::AfterCancelBatchCommit => "after-cancel-batch-commit",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == raw)
    }
}

struct Armed {
    point: CrashPoint,
    after: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let point = CrashPoint::parse(&std::env::var("COURIER_CRASH_AT").ok()?)?;
            let after = std::env::var("COURIER_CRASH_AFTER")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(1)
                .max(1);
            Some(Armed {
                point,
                after,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Aborts the process if this point is armed and its count is reached.
pub fn crash_point(point: CrashPoint) {
    let Some(armed) = armed() else { return };
    if armed.point != point {
        return;
    }
    let hit = armed.hits.fetch_add(1, Ordering::SeqCst) + 1;
    if hit == armed.after {
        eprintln!(
            "courier: crash point `{}` reached (hit {hit}); aborting",
            point.name()
        );
        std::process::abort();
    }
}

/// Aborts the process whenever it handles the message named by
/// `COURIER_CRASH_ON_MESSAGE`: a message that crashes its consumer every time,
/// which only the queue's delivery limit can stop.
pub fn crash_on_message<Id: std::fmt::Display>(message_id: Option<Id>) {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    // Formatting the id only when armed keeps this free on the hot path.
    let Some(target) = TARGET
        .get_or_init(|| std::env::var("COURIER_CRASH_ON_MESSAGE").ok())
        .as_deref()
    else {
        return;
    };
    if let Some(id) = message_id.map(|id| id.to_string())
        && target == id
    {
        eprintln!("courier: crash-on-message `{id}` reached; aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_points_have_stable_names() {
        for point in CrashPoint::ALL {
            assert_eq!(CrashPoint::parse(point.name()), Some(point));
        }
        assert_eq!(CrashPoint::parse("nowhere"), None);
    }
}
