//! The database's ceiling for our two writes: the cancel transaction
//! (`store::orders::cancel`) and the refund transaction
//! (`store::refunds::record_with_inbox`, its `refund.completed` outbox row
//! included), each alone and as the pair an order
//! needs, on 1, 4 and 16 dedicated connections (no pool, so no checkout
//! query). The orders are placed beforehand, untimed.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use chrono::Utc;
use tokio::{task::JoinSet, time::Instant};
use uuid::Uuid;

use crate::{
    domain::{AmountCents, EventId, OrderId, PaymentId, RefundCompleted},
    handlers::refund::NAME as REFUNDS,
    store::{
        self,
        refunds::{NewRefund, RefundRow},
    },
};

/// Which transaction a run repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transaction {
    Cancel,
    Refund,
    /// Cancel, then the refund of the same order: one order's two commits.
    Pair,
}

impl Transaction {
    pub fn label(self) -> &'static str {
        match self {
            Self::Cancel => "cancel tx",
            Self::Refund => "refund tx",
            Self::Pair => "cancel + refund (orders/s)",
        }
    }

    /// Orders a run of `ops` needs placed beforehand.
    pub fn needs_orders(self) -> bool {
        !matches!(self, Self::Refund)
    }
}

fn new_refund(order_id: Uuid, event_id: Uuid) -> anyhow::Result<NewRefund> {
    let now = Utc::now();
    let (payment, amount) = (PaymentId::parse("pay-bench")?, AmountCents::parse(1999)?);
    let gateway_refund_id = format!("re-{event_id}");
    let completed = RefundCompleted::of(
        OrderId::from_uuid(order_id),
        payment.clone(),
        amount,
        gateway_refund_id.clone(),
        now,
    );
    Ok(NewRefund {
        row: RefundRow {
            id: Uuid::now_v7(),
            order_id,
            event_id,
            payment_id: payment.as_str().to_owned(),
            amount_cents: amount.cents(),
            gateway_refund_id,
            status: "completed".to_owned(),
            created_at: now,
            updated_at: now,
        },
        completed: completed.to_record()?,
    })
}

async fn one(
    conn: &mut diesel_async::AsyncPgConnection,
    kind: Transaction,
    order: Option<OrderId>,
) -> anyhow::Result<()> {
    let cancel = async |conn: &mut diesel_async::AsyncPgConnection,
                        id: OrderId|
           -> anyhow::Result<EventId> {
        let (_, event_id) = store::orders::cancel(conn, id, Some("bench"), Utc::now())
            .await
            .map_err(|e| anyhow::anyhow!("cancel: {e}"))?;
        Ok(event_id)
    };
    match (kind, order) {
        (Transaction::Cancel, Some(id)) => {
            cancel(conn, id).await?;
        }
        (Transaction::Pair, Some(id)) => {
            let event_id = cancel(conn, id).await?;
            store::refunds::record_with_inbox(
                conn,
                REFUNDS,
                &new_refund(id.as_uuid(), event_id.as_uuid())?,
            )
            .await?;
        }
        (Transaction::Refund, _) => {
            store::refunds::record_with_inbox(
                conn,
                REFUNDS,
                &new_refund(Uuid::now_v7(), Uuid::now_v7())?,
            )
            .await?;
        }
        (_, None) => anyhow::bail!("{} needs a placed order", kind.label()),
    }
    Ok(())
}

/// Runs `ops` transactions of `kind` on `connections` connections; tx/s
/// (for the pair: orders/s). `orders` must hold `ops` placed orders when
/// the kind needs them.
pub async fn run(
    database_url: &str,
    kind: Transaction,
    connections: usize,
    ops: usize,
    orders: Vec<OrderId>,
) -> anyhow::Result<f64> {
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        conns.push(store::connect(database_url).await?);
    }
    let orders = Arc::new(orders);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for mut conn in conns {
        let (orders, next) = (orders.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ops {
                    return anyhow::Ok(());
                }
                one(&mut conn, kind, orders.get(i).copied()).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}
