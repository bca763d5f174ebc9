//! What the broker should hold for a [`Topology`](super::Topology): every
//! exchange, queue, binding and policy, as plain data. `courier topology
//! apply` declares it and `courier topology check` compares the live broker
//! with it, so both follow the `Topology` value, never a list of names of
//! their own.
//!
//! Queue arguments carry only what RabbitMQ cannot change on a live queue
//! (`x-queue-type`). Every setting an operator may need to change later
//! (delivery limit, dead-lettering, overflow, length limit, a delay tier's
//! TTL) lives in the queue's one policy, `courier.<queue>`, whose pattern
//! matches that queue's name exactly. RabbitMQ applies one policy per queue
//! (the highest priority match), and for several keys a queue argument would
//! win over the policy, so the two must not overlap.

use std::collections::{BTreeMap, HashSet};

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use serde::Serialize;
use serde_json::Value;

use super::permissions::exactly;

/// Our policies' names start with this; a `courier.` policy the plan does not
/// name is stale (a delay tier that was removed, say).
pub const POLICY_PREFIX: &str = "courier.";
/// High enough to win over a broad policy an operator adds for other queues:
/// RabbitMQ applies only the highest-priority match.
pub const POLICY_PRIORITY: i64 = 100;
pub const QUEUE_TYPE: &str = "x-queue-type";
pub const QUORUM: &str = "quorum";

/// Policy keys RabbitMQ also takes as `x-` queue arguments. A live queue
/// carrying one of them as an argument was declared before courier moved
/// these settings into policies: a legacy argument.
pub const POLICY_KEYS: &[&str] = &[
    "delivery-limit",
    "dead-letter-exchange",
    "dead-letter-routing-key",
    "dead-letter-strategy",
    "overflow",
    "max-length",
    "max-length-bytes",
    "message-ttl",
    "expires",
];

/// Queue or exchange arguments, or a policy's definition, as the management
/// API shows them.
pub type Arguments = BTreeMap<String, Value>;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExchangeSpec {
    pub name: String,
    /// `topic`, `fanout` or `direct`, as the management API spells it.
    pub kind: &'static str,
    pub arguments: Arguments,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueSpec {
    pub name: String,
    pub arguments: Arguments,
    /// What the queue is for, as the README's topology table and
    /// `courier topology check` say it.
    pub purpose: String,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct BindingSpec {
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicySpec {
    pub name: String,
    /// The one queue it governs.
    pub queue: String,
    pub pattern: String,
    pub apply_to: &'static str,
    pub priority: i64,
    pub definition: Arguments,
}

/// Everything the broker should hold, in declaration order.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TopologyPlan {
    pub exchanges: Vec<ExchangeSpec>,
    pub queues: Vec<QueueSpec>,
    pub bindings: Vec<BindingSpec>,
    pub policies: Vec<PolicySpec>,
}

impl QueueSpec {
    /// Declares this durable queue with its arguments.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        channel
            .queue_declare(
                self.name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                field_table(&self.arguments),
            )
            .await
            .map(drop)
    }
}

impl TopologyPlan {
    pub fn exchange(&mut self, name: &str, kind: &'static str, arguments: Arguments) {
        self.exchanges.push(ExchangeSpec {
            name: name.to_owned(),
            kind,
            arguments,
        });
    }

    /// A durable quorum queue and its one policy.
    pub fn queue(&mut self, name: &str, purpose: &str, policy: Arguments) {
        self.queues.push(QueueSpec {
            name: name.to_owned(),
            arguments: Arguments::from([(QUEUE_TYPE.to_owned(), Value::from(QUORUM))]),
            purpose: purpose.to_owned(),
        });
        self.policies.push(PolicySpec {
            name: format!("{POLICY_PREFIX}{name}"),
            queue: name.to_owned(),
            pattern: exactly([name.to_owned()]),
            apply_to: "queues",
            priority: POLICY_PRIORITY,
            definition: policy,
        });
    }

    pub fn bind(&mut self, exchange: &str, queue: &str, routing_key: &str) {
        self.bindings.push(BindingSpec {
            exchange: exchange.to_owned(),
            queue: queue.to_owned(),
            routing_key: routing_key.to_owned(),
        });
    }

    pub fn queue_spec(&self, name: &str) -> Option<&QueueSpec> {
        self.queues.iter().find(|q| q.name == name)
    }

    pub fn policy_for(&self, queue: &str) -> Option<&PolicySpec> {
        self.policies.iter().find(|p| p.queue == queue)
    }

    /// Declares exchanges, queues and bindings over AMQP, skipping the
    /// queues in `skip` (left with legacy arguments, which a declare with
    /// ours would refuse); their bindings are still made. Policies are not
    /// AMQP: see [`crate::amqp::management::Management::put_policy`].
    pub async fn declare(
        &self,
        channel: &Channel,
        skip: &HashSet<String>,
    ) -> Result<(), lapin::Error> {
        self.declare_exchanges(channel).await?;
        for queue in self.queues.iter().filter(|q| !skip.contains(&q.name)) {
            queue.declare(channel).await?;
        }
        for binding in &self.bindings {
            channel
                .queue_bind(
                    binding.queue.as_str().into(),
                    binding.exchange.as_str().into(),
                    binding.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// Declares the exchanges only (a migration binds a holding queue to
    /// them before the rest is declared).
    pub async fn declare_exchanges(&self, channel: &Channel) -> Result<(), lapin::Error> {
        for exchange in &self.exchanges {
            let kind = match exchange.kind {
                "topic" => ExchangeKind::Topic,
                "fanout" => ExchangeKind::Fanout,
                _ => ExchangeKind::Direct,
            };
            channel
                .exchange_declare(
                    exchange.name.as_str().into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    field_table(&exchange.arguments),
                )
                .await?;
        }
        Ok(())
    }
}

/// Dead-letter everything this queue drops to `target` through the default
/// exchange. `at-least-once` keeps a dead letter until the target confirmed
/// it; it requires `reject-publish` overflow.
pub fn dead_lettering(target: &str) -> Arguments {
    Arguments::from([
        ("dead-letter-exchange".to_owned(), Value::from("")),
        ("dead-letter-routing-key".to_owned(), Value::from(target)),
        (
            "dead-letter-strategy".to_owned(),
            Value::from("at-least-once"),
        ),
        ("overflow".to_owned(), Value::from("reject-publish")),
    ])
}

/// The policy of a queue that dead-letters nothing (a parking lot): it sets
/// nothing that matters today, but as the queue's one policy it keeps a broad
/// policy added for other queues (a TTL, a length limit that drops) from
/// applying here. Raise `max-length` in it to bound the parking lot.
pub fn parking() -> Arguments {
    Arguments::from([("overflow".to_owned(), Value::from("reject-publish"))])
}

fn field_table(arguments: &Arguments) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in arguments {
        let value = match value {
            Value::String(s) => AMQPValue::LongString(LongString::from(s.clone())),
            Value::Bool(b) => AMQPValue::Boolean(*b),
            Value::Number(n) => AMQPValue::LongLongInt(n.as_i64().unwrap_or_default()),
            other => AMQPValue::LongString(LongString::from(other.to_string())),
        };
        table.insert(key.as_str().into(), value);
    }
    table
}
