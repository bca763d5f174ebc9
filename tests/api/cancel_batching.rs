//! Group commit of cancels: cancels that arrive while a batch is being
//! written are written together, in one statement and one commit, and each
//! is answered by its own outcome.

use std::time::Duration;

use courier::{
    domain::{CancelError, OrderId},
    http::{CancelBatching, CancelQueue},
    store::{cancel_batch::CancelRequest, orders::ChangeOrderError},
};
use uuid::Uuid;

use crate::helpers::{TestEnv, release_row_lock, wait_until};

fn request(id: OrderId) -> CancelRequest {
    CancelRequest {
        id,
        correlation_id: Some(format!("req-{id}")),
    }
}

/// The first batch is held on a row lock the test owns while ten more
/// cancels queue up behind it: placed orders, a shipped one, an unknown id
/// and the same order twice. Released, they are written as one batch (one
/// transaction id on every event) and each gets what it would have got alone.
#[tokio::test]
async fn cancels_that_arrive_together_commit_together_and_each_gets_its_own_answer()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let queue = CancelQueue::spawn(
        env.db.clone(),
        CancelBatching {
            max: 64,
            in_flight: 1,
        },
        None,
    );
    let blocker = env.place_order("pay-blocker").await;
    let mut placed = Vec::new();
    for n in 0..7 {
        placed.push(env.place_order(&format!("pay-batch-{n}")).await.id);
    }
    let shipped = env.place_order("pay-shipped").await.id;
    env.execute(&format!(
        "UPDATE orders SET state = 'shipped', version = version + 1 WHERE id = '{shipped}'"
    ))
    .await;
    let unknown = OrderId::from_uuid(Uuid::now_v7());

    let mut holder = env.lock_order_row(&blocker.id.to_string()).await?;
    let first = tokio::spawn({
        let queue = queue.clone();
        async move { queue.cancel(request(blocker.id)).await }
    });
    env.wait_for_lock_waiters(1, "the first batch waits for the order's row lock")
        .await;

    let asked: Vec<OrderId> = placed
        .iter()
        .copied()
        .chain([shipped, unknown, placed[0]])
        .collect();
    let answers: Vec<_> = asked
        .iter()
        .map(|&id| {
            let queue = queue.clone();
            tokio::spawn(async move { queue.cancel(request(id)).await })
        })
        .collect();
    wait_until(
        "ten cancels queue behind the held batch",
        Duration::from_secs(10),
        async || queue.queued() == asked.len(),
    )
    .await;
    release_row_lock(&mut holder).await?;

    assert!(first.await?.is_ok(), "the held cancel goes through");
    let mut outcomes = Vec::new();
    for answer in answers {
        outcomes.push(answer.await?);
    }
    for (id, outcome) in placed.iter().zip(&outcomes) {
        let Ok((order, _)) = outcome else {
            panic!("order {id} is canceled: {outcome:?}");
        };
        assert_eq!(order.id, *id);
    }
    assert!(matches!(
        outcomes[7],
        Err(ChangeOrderError::Refused(CancelError::AlreadyShipped(_)))
    ));
    assert!(matches!(outcomes[8], Err(ChangeOrderError::NotFound(_))));
    assert!(
        matches!(
            outcomes[9],
            Err(ChangeOrderError::Refused(CancelError::AlreadyCanceled(_)))
        ),
        "the second cancel of an order in one batch is refused: {:?}",
        outcomes[9]
    );

    let ids: Vec<String> = placed.iter().map(|id| format!("'{id}'")).collect();
    let of_batch = format!("aggregate_id IN ({})", ids.join(","));
    assert_eq!(
        env.count(&format!("SELECT count(*) FROM outbox WHERE {of_batch}"))
            .await,
        7,
        "one event per canceled order"
    );
    assert_eq!(
        env.count(&format!(
            "SELECT count(DISTINCT tx_id) FROM outbox WHERE {of_batch}"
        ))
        .await,
        1,
        "the queued cancels were written in one transaction"
    );
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM outbox WHERE aggregate_id IN ('{shipped}', '{unknown}')"
        ))
        .await,
        0,
        "refused cancels raise nothing"
    );
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM outbox o JOIN orders ON orders.id::text = o.aggregate_id \
             WHERE o.correlation_id = 'req-' || o.aggregate_id AND orders.state = 'canceled' \
             AND {of_batch}"
        ))
        .await,
        7,
        "each event carries its own request's correlation id"
    );
    Ok(())
}
