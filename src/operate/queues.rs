//! Where messages are right now, for `courier check`: each worker's delay
//! tiers and dead-letter queue, counted exactly by passive declares as the
//! operator (the management API's counts lag by seconds).

use anyhow::Context;
use serde::Serialize;

use crate::{
    amqp::{Topology, connection::connect_as_operator, topology::passive_queue},
    config::AmqpSettings,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerCounts {
    pub worker: String,
    /// Messages waiting in each delay tier, in tier order.
    pub retrying: Vec<(String, u32)>,
    pub dead: u32,
}

impl WorkerCounts {
    pub fn retrying_total(&self) -> u32 {
        self.retrying.iter().map(|(_, n)| n).sum()
    }
}

pub async fn worker_counts(
    amqp: &AmqpSettings,
    topology: &Topology,
) -> anyhow::Result<Vec<WorkerCounts>> {
    let connection = connect_as_operator(amqp, "courier-check").await?;
    let channel = connection.create_channel().await?;
    let count = async |queue: &str| -> anyhow::Result<u32> {
        Ok(passive_queue(&channel, queue)
            .await
            .with_context(|| format!("queue `{queue}` (run `courier topology apply`)"))?
            .message_count())
    };
    let mut counts = Vec::new();
    for worker in &topology.workers {
        let mut retrying = Vec::new();
        for queue in worker.retry_queues() {
            let n = count(&queue).await?;
            retrying.push((queue, n));
        }
        counts.push(WorkerCounts {
            worker: worker.name.clone(),
            retrying,
            dead: count(&worker.dead()).await?,
        });
    }
    let _ = connection.close(200, "counted".into()).await;
    Ok(counts)
}
