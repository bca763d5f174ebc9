//! The order service's consumer of the refund context's events: records on
//! each order what became of its refund (`refund.completed` ->
//! `refunded`, `refund.failed` -> `refund_failed` with the reason), by the
//! domain's convergence rule, so `refunded` is final and a late failure
//! never overwrites it, whatever order the events arrive in.
//!
//! It runs in the order service's process, as the order service's broker
//! user: the refund context never writes the order service's tables itself.

use diesel_async::AsyncPgConnection;

use super::{Handled, HandlerError, Work, recording::Recording};
use crate::{
    domain::{IncomingEvent, RefundStatus},
    store::{
        StoreError,
        orders::{self, RefundReport, ReportRecorded},
    },
};

pub const NAME: &str = "orders.refund-status";

pub struct RefundStatusRecording;

impl Recording for RefundStatusRecording {
    const NAME: &'static str = NAME;
    type Item = RefundReport;
    type Recorded = ReportRecorded;

    fn item_of(work: &Work<'_>) -> Result<RefundReport, HandlerError> {
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
    }

    async fn record(
        conn: &mut AsyncPgConnection,
        items: &[RefundReport],
    ) -> Result<Vec<ReportRecorded>, StoreError> {
        orders::record_refund_reports_with_inbox(conn, NAME, items).await
    }

    fn outcome_of(
        report: &RefundReport,
        recorded: ReportRecorded,
    ) -> Result<Handled, HandlerError> {
        match recorded {
            ReportRecorded::Changed => Ok(Handled::Done),
            // Superseded: `refunded` already, or a newer failure.
            ReportRecorded::Unchanged => Ok(Handled::Skipped),
            ReportRecorded::AlreadyProcessed => Ok(Handled::AlreadyProcessed),
            ReportRecorded::UnknownOrder => Err(HandlerError::Permanent(format!(
                "order {} does not exist",
                report.order_id
            ))),
        }
    }
}
