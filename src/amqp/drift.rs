//! `courier topology check`: every difference between what the broker holds
//! and what the [`TopologyPlan`] says it should, named. Pure: the live state
//! comes from [`Management::live_topology`](super::management::Management::live_topology).

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::Value;

use super::{
    management::{LivePolicy, LiveTopology},
    plan::{POLICY_KEYS, POLICY_PREFIX, QUORUM, TopologyPlan},
};

/// One difference between the broker and the plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "drift", rename_all = "kebab-case")]
pub enum Drift {
    MissingExchange {
        exchange: String,
    },
    Exchange {
        exchange: String,
        detail: String,
    },
    UnexpectedExchange {
        exchange: String,
    },
    MissingQueue {
        queue: String,
    },
    Queue {
        queue: String,
        detail: String,
    },
    /// A setting declared as a queue argument before courier moved it into
    /// the queue's policy; the argument wins over the policy for some keys.
    LegacyArgument {
        queue: String,
        argument: String,
        value: Value,
        policy: String,
    },
    UnexpectedArgument {
        queue: String,
        argument: String,
        value: Value,
    },
    UnexpectedQueue {
        queue: String,
        messages: Option<u64>,
    },
    MissingBinding {
        exchange: String,
        queue: String,
        routing_key: String,
    },
    UnexpectedBinding {
        exchange: String,
        queue: String,
        routing_key: String,
    },
    MissingPolicy {
        policy: String,
        queue: String,
    },
    Policy {
        policy: String,
        detail: String,
    },
    /// Another policy wins for the queue, so ours does not apply at all.
    PolicyShadowed {
        queue: String,
        policy: String,
        by: String,
    },
    UnexpectedPolicy {
        policy: String,
    },
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MissingExchange { exchange } => write!(f, "missing exchange `{exchange}`"),
            Self::Exchange { exchange, detail } => write!(f, "exchange `{exchange}`: {detail}"),
            Self::UnexpectedExchange { exchange } => {
                write!(
                    f,
                    "unexpected exchange `{exchange}` (not declared by courier)"
                )
            }
            Self::MissingQueue { queue } => write!(f, "missing queue `{queue}`"),
            Self::Queue { queue, detail } => write!(f, "queue `{queue}`: {detail}"),
            Self::LegacyArgument {
                queue,
                argument,
                value,
                policy,
            } => write!(
                f,
                "queue `{queue}`: legacy argument {argument} = {value} (now set by policy `{policy}`; `courier topology apply` declares the queue again once it is drained and idle)"
            ),
            Self::UnexpectedArgument {
                queue,
                argument,
                value,
            } => write!(
                f,
                "queue `{queue}`: unexpected argument {argument} = {value}"
            ),
            Self::UnexpectedQueue { queue, messages } => write!(
                f,
                "unexpected queue `{queue}` (not declared by courier; {} messages)",
                messages.map_or_else(|| "?".to_owned(), |m| m.to_string())
            ),
            Self::MissingBinding {
                exchange,
                queue,
                routing_key,
            } => write!(
                f,
                "missing binding `{exchange}` -> `{queue}` with key `{routing_key}`"
            ),
            Self::UnexpectedBinding {
                exchange,
                queue,
                routing_key,
            } => write!(
                f,
                "unexpected binding `{exchange}` -> `{queue}` with key `{routing_key}`"
            ),
            Self::MissingPolicy { policy, queue } => {
                write!(f, "missing policy `{policy}` for queue `{queue}`")
            }
            Self::Policy { policy, detail } => write!(f, "policy drift `{policy}`: {detail}"),
            Self::PolicyShadowed { queue, policy, by } => write!(
                f,
                "policy drift: queue `{queue}` is governed by policy `{by}`, not `{policy}` (RabbitMQ applies one policy per queue, the highest priority)"
            ),
            Self::UnexpectedPolicy { policy } => write!(
                f,
                "unexpected policy `{policy}` (named like courier's, governs no queue of the topology)"
            ),
        }
    }
}

/// Every difference, in a stable order: exchanges, queues, bindings, policies.
pub fn compare(plan: &TopologyPlan, live: &LiveTopology) -> Vec<Drift> {
    let mut drifts = Vec::new();
    exchanges(plan, live, &mut drifts);
    queues(plan, live, &mut drifts);
    bindings(plan, live, &mut drifts);
    policies(plan, live, &mut drifts);
    drifts
}

fn exchanges(plan: &TopologyPlan, live: &LiveTopology, drifts: &mut Vec<Drift>) {
    for expected in &plan.exchanges {
        let Some(found) = live.exchanges.iter().find(|e| e.name == expected.name) else {
            drifts.push(Drift::MissingExchange {
                exchange: expected.name.clone(),
            });
            continue;
        };
        let mut differs = |detail: String| {
            drifts.push(Drift::Exchange {
                exchange: expected.name.clone(),
                detail,
            });
        };
        if found.kind != expected.kind {
            differs(format!(
                "type is {}, expected {}",
                found.kind, expected.kind
            ));
        }
        if !found.durable {
            differs("not durable".to_owned());
        }
        for detail in map_differences("argument", &expected.arguments, &found.arguments) {
            differs(detail);
        }
    }
    for found in &live.exchanges {
        let builtin = found.name.is_empty() || found.name.starts_with("amq.");
        if !builtin && !plan.exchanges.iter().any(|e| e.name == found.name) {
            drifts.push(Drift::UnexpectedExchange {
                exchange: found.name.clone(),
            });
        }
    }
}

fn queues(plan: &TopologyPlan, live: &LiveTopology, drifts: &mut Vec<Drift>) {
    for expected in &plan.queues {
        let Some(found) = live.queues.iter().find(|q| q.name == expected.name) else {
            drifts.push(Drift::MissingQueue {
                queue: expected.name.clone(),
            });
            continue;
        };
        if found.kind != QUORUM {
            drifts.push(Drift::Queue {
                queue: expected.name.clone(),
                detail: format!("type is {}, expected {QUORUM}", found.kind),
            });
        }
        if !found.durable {
            drifts.push(Drift::Queue {
                queue: expected.name.clone(),
                detail: "not durable".to_owned(),
            });
        }
        let policy = plan
            .policy_for(&expected.name)
            .map(|p| p.name.clone())
            .unwrap_or_default();
        for (argument, value) in &found.arguments {
            if expected.arguments.contains_key(argument) {
                continue;
            }
            let legacy = argument
                .strip_prefix("x-")
                .is_some_and(|key| POLICY_KEYS.contains(&key));
            drifts.push(if legacy {
                Drift::LegacyArgument {
                    queue: expected.name.clone(),
                    argument: argument.clone(),
                    value: value.clone(),
                    policy: policy.clone(),
                }
            } else {
                Drift::UnexpectedArgument {
                    queue: expected.name.clone(),
                    argument: argument.clone(),
                    value: value.clone(),
                }
            });
        }
    }
    for found in &live.queues {
        if plan.queue_spec(&found.name).is_none() {
            drifts.push(Drift::UnexpectedQueue {
                queue: found.name.clone(),
                messages: found.messages,
            });
        }
    }
}

fn bindings(plan: &TopologyPlan, live: &LiveTopology, drifts: &mut Vec<Drift>) {
    let expected: BTreeSet<(&str, &str, &str)> = plan
        .bindings
        .iter()
        .map(|b| {
            (
                b.exchange.as_str(),
                b.queue.as_str(),
                b.routing_key.as_str(),
            )
        })
        .collect();
    // The default exchange's implicit bindings are not ours to check.
    let found: BTreeSet<(&str, &str, &str)> = live
        .bindings
        .iter()
        .filter(|b| !b.source.is_empty() && b.destination_type == "queue")
        .filter(|b| {
            plan.exchanges.iter().any(|e| e.name == b.source)
                || plan.queue_spec(&b.destination).is_some()
        })
        .map(|b| {
            (
                b.source.as_str(),
                b.destination.as_str(),
                b.routing_key.as_str(),
            )
        })
        .collect();
    for (exchange, queue, key) in expected.difference(&found) {
        drifts.push(Drift::MissingBinding {
            exchange: (*exchange).to_owned(),
            queue: (*queue).to_owned(),
            routing_key: (*key).to_owned(),
        });
    }
    for (exchange, queue, key) in found.difference(&expected) {
        drifts.push(Drift::UnexpectedBinding {
            exchange: (*exchange).to_owned(),
            queue: (*queue).to_owned(),
            routing_key: (*key).to_owned(),
        });
    }
}

fn policies(plan: &TopologyPlan, live: &LiveTopology, drifts: &mut Vec<Drift>) {
    for expected in &plan.policies {
        let Some(found) = live.policies.iter().find(|p| p.name == expected.name) else {
            drifts.push(Drift::MissingPolicy {
                policy: expected.name.clone(),
                queue: expected.queue.clone(),
            });
            continue;
        };
        let mut differs = |detail: String| {
            drifts.push(Drift::Policy {
                policy: expected.name.clone(),
                detail,
            });
        };
        if found.pattern != expected.pattern {
            differs(format!(
                "pattern is `{}`, expected `{}`",
                found.pattern, expected.pattern
            ));
        }
        if found.apply_to != expected.apply_to {
            differs(format!(
                "applies to {}, expected {}",
                found.apply_to, expected.apply_to
            ));
        }
        if found.priority != expected.priority {
            differs(format!(
                "priority is {}, expected {}",
                found.priority, expected.priority
            ));
        }
        for detail in map_differences("", &expected.definition, &found.definition) {
            differs(detail);
        }
        if let Some(winner) = governing_policy(&live.policies, &expected.queue)
            && winner.name != expected.name
        {
            drifts.push(Drift::PolicyShadowed {
                queue: expected.queue.clone(),
                policy: expected.name.clone(),
                by: winner.name.clone(),
            });
        }
    }
    for found in &live.policies {
        if found.name.starts_with(POLICY_PREFIX)
            && !plan.policies.iter().any(|p| p.name == found.name)
        {
            drifts.push(Drift::UnexpectedPolicy {
                policy: found.name.clone(),
            });
        }
    }
}

/// The policy RabbitMQ applies to `queue`: the highest priority among those
/// whose pattern matches its name and that apply to queues. Computed here
/// rather than read from the queue's `policy` field, which the management
/// API's statistics report seconds late.
fn governing_policy<'a>(policies: &'a [LivePolicy], queue: &str) -> Option<&'a LivePolicy> {
    policies
        .iter()
        .filter(|p| p.apply_to == "queues" || p.apply_to == "all")
        .filter(|p| regex::Regex::new(&p.pattern).is_ok_and(|re| re.is_match(queue)))
        .max_by_key(|p| p.priority)
}

/// `key = value, expected …` for every key that differs between two maps.
fn map_differences(
    what: &str,
    expected: &super::plan::Arguments,
    found: &super::plan::Arguments,
) -> Vec<String> {
    let label = |key: &str| {
        if what.is_empty() {
            key.to_owned()
        } else {
            format!("{what} {key}")
        }
    };
    let keys: BTreeSet<&String> = expected.keys().chain(found.keys()).collect();
    keys.into_iter()
        .filter_map(|key| match (expected.get(key), found.get(key)) {
            (Some(e), Some(f)) if e == f => None,
            (Some(e), Some(f)) => Some(format!("{} is {f}, expected {e}", label(key))),
            (Some(e), None) => Some(format!("{} is missing, expected {e}", label(key))),
            (None, Some(f)) => Some(format!("{} = {f} is not expected", label(key))),
            (None, None) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::{
        Topology,
        management::{LiveBinding, LiveExchange, LiveQueue},
    };

    fn topology() -> Topology {
        crate::amqp::topology::example(&["refunds"], 1)
    }

    /// The live state a faithful `apply` leaves behind.
    fn applied(plan: &TopologyPlan) -> LiveTopology {
        LiveTopology {
            exchanges: plan
                .exchanges
                .iter()
                .map(|e| LiveExchange {
                    name: e.name.clone(),
                    kind: e.kind.to_owned(),
                    durable: true,
                    arguments: e.arguments.clone(),
                })
                .collect(),
            queues: plan
                .queues
                .iter()
                .map(|q| LiveQueue {
                    name: q.name.clone(),
                    durable: true,
                    kind: QUORUM.to_owned(),
                    arguments: q.arguments.clone(),
                    messages: Some(0),
                })
                .collect(),
            bindings: plan
                .bindings
                .iter()
                .map(|b| LiveBinding {
                    source: b.exchange.clone(),
                    destination: b.queue.clone(),
                    destination_type: "queue".into(),
                    routing_key: b.routing_key.clone(),
                })
                .collect(),
            policies: plan
                .policies
                .iter()
                .map(|p| LivePolicy {
                    name: p.name.clone(),
                    pattern: p.pattern.clone(),
                    apply_to: p.apply_to.to_owned(),
                    priority: p.priority,
                    definition: p.definition.clone(),
                })
                .collect(),
        }
    }

    #[test]
    fn an_applied_plan_has_no_drift_and_each_queue_has_one_policy_of_its_own() {
        let plan = topology().plan();
        assert_eq!(compare(&plan, &applied(&plan)), vec![]);
        for queue in &plan.queues {
            let policy = plan.policy_for(&queue.name);
            assert!(
                policy.is_some_and(|p| regex::Regex::new(&p.pattern)
                    .is_ok_and(|re| re.is_match(&queue.name))
                    && plan
                        .queues
                        .iter()
                        .filter(|q| re_matches(&p.pattern, &q.name))
                        .count()
                        == 1),
                "{}: {policy:?}",
                queue.name
            );
            assert_eq!(
                queue.arguments.keys().collect::<Vec<_>>(),
                vec!["x-queue-type"]
            );
        }
    }

    fn re_matches(pattern: &str, name: &str) -> bool {
        regex::Regex::new(pattern).is_ok_and(|re| re.is_match(name))
    }

    #[test]
    fn a_legacy_argument_is_named_with_the_policy_that_now_owns_it() {
        let plan = topology().plan();
        let mut live = applied(&plan);
        if let Some(refunds) = live.queues.iter_mut().find(|q| q.name == "refunds") {
            refunds
                .arguments
                .insert("x-delivery-limit".into(), Value::from(10));
        }
        let drifts = compare(&plan, &live);
        assert_eq!(
            drifts,
            vec![Drift::LegacyArgument {
                queue: "refunds".into(),
                argument: "x-delivery-limit".into(),
                value: Value::from(10),
                policy: "courier.refunds".into(),
            }]
        );
        assert!(
            drifts[0]
                .to_string()
                .contains("legacy argument x-delivery-limit = 10")
        );
    }

    #[test]
    fn a_broader_policy_of_higher_priority_shadows_ours() {
        let plan = topology().plan();
        let mut live = applied(&plan);
        live.policies.push(LivePolicy {
            name: "everything".into(),
            pattern: ".*".into(),
            apply_to: "all".into(),
            priority: 500,
            definition: [("max-length".to_owned(), Value::from(1))].into(),
        });
        let shadowed: Vec<_> = compare(&plan, &live)
            .into_iter()
            .filter(|d| matches!(d, Drift::PolicyShadowed { .. }))
            .collect();
        assert_eq!(shadowed.len(), plan.queues.len());
    }

    #[test]
    fn missing_and_unexpected_bindings_and_a_changed_policy_value_are_named() {
        let plan = topology().plan();
        let mut live = applied(&plan);
        live.bindings.retain(|b| b.destination != "refunds");
        live.bindings.push(LiveBinding {
            source: "orders.events".into(),
            destination: "debug".into(),
            destination_type: "queue".into(),
            routing_key: "#".into(),
        });
        if let Some(policy) = live
            .policies
            .iter_mut()
            .find(|p| p.name == "courier.refunds")
        {
            policy
                .definition
                .insert("delivery-limit".into(), Value::from(3));
        }
        let text: Vec<String> = compare(&plan, &live)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            vec![
                "missing binding `orders.events` -> `refunds` with key `order.canceled`",
                "unexpected binding `orders.events` -> `debug` with key `#`",
                "policy drift `courier.refunds`: delivery-limit is 3, expected 10",
            ]
        );
    }
}
