//! The order service's consumer of the refund context's events: records on
//! each order what became of its refund (`refund.completed` ->
//! `refunded`, `refund.failed` -> `refund_failed` with the reason), by the
//! domain's convergence rule, so `refunded` is final and a late failure
//! never overwrites it, whatever order the events arrive in.
//!
//! It runs in the order service's process, as the order service's broker
//! user: the refund context never writes the order service's tables itself.

use std::time::Duration;

use diesel_async::AsyncPgConnection;

use super::{Handled, Handler, HandlerError, Outcomes, RecordBatch, Work, handle_by_recording};
use crate::{
    domain::{IncomingEvent, RefundStatus},
    store::{
        DbPool, StoreError,
        orders::{self, RefundReport, ReportRecorded},
    },
};

pub const NAME: &str = "orders.refund-status";

pub struct RefundStatusHandler {
    db: DbPool,
}

impl RefundStatusHandler {
    pub fn new(db: DbPool) -> Self {
        Self { db }
    }
}

impl RecordBatch<RefundReport> for RefundStatusHandler {
    type Recorded = ReportRecorded;

    async fn record(
        &self,
        conn: &mut AsyncPgConnection,
        items: &[RefundReport],
    ) -> Result<Vec<ReportRecorded>, StoreError> {
        orders::record_refund_reports_with_inbox(conn, NAME, items).await
    }
}

impl Handler for RefundStatusHandler {
    fn name(&self) -> &str {
        NAME
    }

    /// Records the batch's reports and their inbox rows in one transaction;
    /// no external call, so `deadline` is not needed.
    async fn handle_batch(&self, batch: &[Work<'_>], _deadline: Duration) -> Outcomes {
        handle_by_recording(
            &self.db,
            self,
            batch,
            |work| {
                let (order_id, status) = match work.event {
                    IncomingEvent::RefundCompleted(e) => (e.order_id, RefundStatus::completed(e)),
                    IncomingEvent::RefundFailed(e) => (e.order_id, RefundStatus::failed(e)),
                    other => return Err(HandlerError::unexpected(NAME, other)),
                };
                Ok(RefundReport {
                    message_id: work.message_id,
                    order_id,
                    status,
                })
            },
            |report, recorded| match recorded {
                ReportRecorded::Changed => Ok(Handled::Done),
                ReportRecorded::Unchanged => Ok(Handled::Skipped),
                ReportRecorded::AlreadyProcessed => Ok(Handled::AlreadyProcessed),
                ReportRecorded::UnknownOrder => Err(HandlerError::Permanent(format!(
                    "order {} does not exist",
                    report.order_id
                ))),
            },
        )
        .await
    }
}
