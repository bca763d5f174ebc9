//! The checker: compares ground truth after a run. Canceled orders vs refunds
//! in our database vs the gateway's ledger vs dead letters vs pending outbox
//! rows, each canceled order's refund status, and the shipping read model
//! against the orders. A run passes only with nothing lost, nothing doubled,
//! nothing stuck, every canceled order's refund status set and agreeing with
//! its refund, and the read model converged.

use std::collections::{BTreeMap, HashMap, HashSet};

use diesel_async::AsyncPgConnection;
use lapin::{
    Connection,
    options::{BasicGetOptions, BasicNackOptions},
};
use uuid::Uuid;

use crate::{
    amqp::{
        envelope::{self, headers},
        topology::dead_letter_queue,
    },
    config::{AmqpSettings, GatewaySettings},
    domain::{RefundKey, RefundStatus},
    gateway::client::{GatewayClient, LedgerEntry},
    handlers::refund,
    store::ground_truth::{self, ShippingFacts},
};

/// How the report names a canceled order that has no refund status yet.
pub const NO_STATUS: &str = "none";

/// What the checker found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub canceled: usize,
    pub refunded: usize,
    /// Refunds the gateway's ledger holds for these orders' events.
    pub refunds_in_gateway: usize,
    /// Canceled orders whose refund was dead-lettered, by `x-error-kind`
    /// (`delivery-limit` when the broker itself dead-lettered it).
    pub dead_lettered: BTreeMap<String, usize>,
    /// Canceled orders neither refunded nor dead-lettered.
    pub lost: Vec<Uuid>,
    /// Orders refunded more than once (in our database or in the ledger).
    pub doubled: Vec<Uuid>,
    /// Refunds the gateway's ledger holds for no canceled order: for an order
    /// that does not exist or is not canceled, or under a key courier did not
    /// make (its idempotency key, as the ledger shows it).
    pub without_cancel: Vec<String>,
    /// Outbox rows never confirmed by the broker.
    pub stuck: i64,
    /// Orders the gateway refunded whose message was dead-lettered before our
    /// database recorded it (a crash between the gateway call and the commit,
    /// then the delivery limit). Not doubled, not lost: replaying the dead
    /// letter gets the same refund back from the gateway and records it.
    pub refunded_but_shelved: Vec<Uuid>,
    /// Canceled orders by refund status (`refunded`, `refund_failed`, `none`).
    pub refund_statuses: BTreeMap<String, usize>,
    /// Canceled orders with no refund status although their refund was
    /// decided (refunded or dead-lettered by us). Those the broker itself
    /// shelved (`delivery-limit`) are apart: no code of ours saw them go.
    pub without_status: Vec<Uuid>,
    /// Canceled orders shelved by the broker's delivery limit, with no status.
    pub shelved_by_broker_without_status: Vec<Uuid>,
    /// Canceled orders whose status says other than their refund record:
    /// `refunded` without a refund, or a refund without `refunded`.
    pub status_mismatch: Vec<Uuid>,
    /// Orders whose shipping address changed, in scope.
    pub shipping_changed: usize,
    /// Of those, the ones the shipping read model does not hold at the
    /// newest version and the order's address.
    pub unconverged: Vec<Uuid>,
}

impl Report {
    pub fn dead_total(&self) -> usize {
        self.dead_lettered.values().sum()
    }

    /// Every cancellation has an outcome, none was doubled or left in the
    /// outbox, no money moved for an order nobody canceled, every decided
    /// refund shows on its order, and the read model converged.
    pub fn passed(&self) -> bool {
        self.lost.is_empty()
            && self.doubled.is_empty()
            && self.without_cancel.is_empty()
            && self.stuck == 0
            && self.without_status.is_empty()
            && self.status_mismatch.is_empty()
            && self.unconverged.is_empty()
    }
}

impl Report {
    /// The table lines about refund statuses and the shipping read model,
    /// as `courier check` prints them: (label, value).
    pub fn event_model_lines(&self) -> Vec<(String, String)> {
        let mut lines: Vec<(String, String)> = self
            .refund_statuses
            .iter()
            .map(|(status, n)| (format!("refund status {status}"), n.to_string()))
            .collect();
        lines.extend([
            (
                "without a refund status".to_owned(),
                self.without_status.len().to_string(),
            ),
            (
                "shelved by the broker, no status".to_owned(),
                self.shelved_by_broker_without_status.len().to_string(),
            ),
            (
                "status disagrees with refund".to_owned(),
                self.status_mismatch.len().to_string(),
            ),
            (
                "orders whose address changed".to_owned(),
                self.shipping_changed.to_string(),
            ),
            (
                "shipping read model behind".to_owned(),
                self.unconverged.len().to_string(),
            ),
        ]);
        lines
    }

    /// Each order that fails the refund-status or read-model checks, with why.
    pub fn event_model_findings(&self) -> impl Iterator<Item = (&'static str, &Uuid)> {
        [
            ("no refund status", &self.without_status),
            (
                "refund status disagrees with the refund",
                &self.status_mismatch,
            ),
            ("shipping read model behind", &self.unconverged),
        ]
        .into_iter()
        .flat_map(|(what, orders)| orders.iter().map(move |order| (what, order)))
    }
}

/// One message in a dead-letter queue, read without taking it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub message_id: Option<String>,
    pub kind: String,
    pub error: Option<String>,
}

/// Reads every message in `queue` and gives them all back (nack with
/// requeue), so the queue is unchanged for operators.
pub async fn peek_dead_letters(
    broker: &Connection,
    queue: &str,
) -> Result<Vec<DeadLetter>, lapin::Error> {
    let channel = broker.create_channel().await?;
    let mut letters = Vec::new();
    let mut last_tag = None;
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await?
    {
        let properties = &message.delivery.properties;
        let kind = envelope::header_text(properties, headers::ERROR_KIND).unwrap_or_else(|| {
            // The broker dead-lettered it itself: a consumer crash loop hit
            // the queue's delivery limit.
            BROKER_SHELVED.to_owned()
        });
        letters.push(DeadLetter {
            message_id: properties.message_id().as_ref().map(ToString::to_string),
            kind,
            error: envelope::header_text(properties, headers::LAST_ERROR),
        });
        last_tag = Some(message.delivery.delivery_tag);
    }
    if let Some(tag) = last_tag {
        channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await?;
    }
    channel.close(200, "peeked".into()).await?;
    Ok(letters)
}

/// What our database says: each canceled order's event, its refunds and its
/// refund status, the events still pending, and the shipping read model.
/// Load it *before* reading the gateway's ledger and the dead letters: a
/// refund committed in between is then in the ledger too, never in our
/// database alone.
#[derive(Debug, Clone, Default)]
pub struct DatabaseFacts {
    /// Event id -> order id, for every `order.canceled` in scope.
    events: HashMap<Uuid, Uuid>,
    /// Every canceled order in the database, in scope or not (a ledger
    /// refund for anything else moved money nobody decided on), with its
    /// refund status.
    all_canceled: HashMap<Uuid, Option<String>>,
    refund_order_ids: Vec<Uuid>,
    /// Pending events' aggregates, in scope.
    pending_aggregates: Vec<Uuid>,
    /// Orders in scope whose shipping address changed.
    shipping: Vec<ShippingFacts>,
}

impl DatabaseFacts {
    /// Reads every canceled order in the database (or only `scope`, if given).
    pub async fn load(
        db: &mut AsyncPgConnection,
        scope: Option<&HashSet<Uuid>>,
    ) -> Result<Self, diesel::result::Error> {
        let in_scope = |order: &Uuid| scope.is_none_or(|s| s.contains(order));
        let order_of = |(event, aggregate): (Uuid, String)| {
            Uuid::parse_str(&aggregate)
                .ok()
                .filter(|order| in_scope(order))
                .map(|order| (event, order))
        };
        let events = ground_truth::canceled_events(db)
            .await?
            .into_iter()
            .filter_map(order_of)
            .collect();
        let all_canceled = ground_truth::canceled_orders(db)
            .await?
            .into_iter()
            .collect();
        let refund_order_ids = ground_truth::refunded_orders(db).await?;
        let pending_aggregates = ground_truth::pending_events(db)
            .await?
            .into_iter()
            .filter_map(order_of)
            .map(|(_, order)| order)
            .collect();
        let shipping = ground_truth::shipping(db)
            .await?
            .into_iter()
            .filter(|s| in_scope(&s.order_id))
            .collect();
        Ok(Self {
            events,
            all_canceled,
            refund_order_ids,
            pending_aggregates,
            shipping,
        })
    }
}

/// Reads all three sources in the safe order (our database, then the
/// refunds' dead letters on a connection of its own, then the gateway's
/// ledger) and compares them. Also returns the dead letters it read, for
/// callers that show why messages were shelved.
pub async fn gather(
    db: &mut AsyncPgConnection,
    amqp: &AmqpSettings,
    gateway: &GatewaySettings,
    scope: Option<&HashSet<Uuid>>,
) -> anyhow::Result<(Report, Vec<DeadLetter>)> {
    let facts = DatabaseFacts::load(db, scope).await?;
    // A fresh connection each time: the broker may have restarted since the last check.
    let broker = Connection::connect(
        &amqp.uri_as(&amqp.operator),
        lapin::ConnectionProperties::default(),
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "the checker cannot reach {}: {e}",
            amqp.display_addr_as(&amqp.operator)
        )
    })?;
    let dead_letters = peek_dead_letters(&broker, &dead_letter_queue(refund::NAME)).await?;
    let _ = broker.close(200, "checked".into()).await;
    let ledger = GatewayClient::new(gateway)?
        .ledger()
        .await
        .map_err(|e| anyhow::anyhow!("reading the gateway's ledger at {}: {e}", gateway.url))?;
    Ok((check(&facts, &ledger, &dead_letters), dead_letters))
}

/// The order a ledger refund was made for: by the order's [`RefundKey`], or,
/// for refunds made before keys came from orders, by the event id it carried.
fn ledger_order(entry: &LedgerEntry, events: &HashMap<Uuid, Uuid>) -> Option<Uuid> {
    RefundKey::order_of(&entry.idempotency_key)
        .map(|order| order.as_uuid())
        .or_else(|| {
            Uuid::parse_str(&entry.idempotency_key)
                .ok()
                .and_then(|event| events.get(&event).copied())
        })
}

/// Compares the database's facts with the gateway's ledger and the refunds'
/// dead letters.
pub fn check(
    facts: &DatabaseFacts,
    ledger: &[LedgerEntry],
    refund_dead_letters: &[DeadLetter],
) -> Report {
    let events = &facts.events;
    let orders: HashSet<Uuid> = events.values().copied().collect();
    let mut refunds_per_order: HashMap<Uuid, usize> = HashMap::new();
    for order in facts.refund_order_ids.iter().filter(|o| orders.contains(o)) {
        *refunds_per_order.entry(*order).or_default() += 1;
    }
    let mut ledger_per_order: HashMap<Uuid, usize> = HashMap::new();
    let mut without_cancel = Vec::new();
    for entry in ledger {
        match ledger_order(entry, events) {
            Some(order) if facts.all_canceled.contains_key(&order) => {
                if orders.contains(&order) {
                    *ledger_per_order.entry(order).or_default() += 1;
                }
            }
            _ => without_cancel.push(entry.idempotency_key.clone()),
        }
    }
    let mut dead_lettered = BTreeMap::new();
    let mut dead_orders = HashSet::new();
    let mut shelved_by_broker = HashSet::new();
    for letter in refund_dead_letters {
        let order = letter
            .message_id
            .as_deref()
            .and_then(|id| Uuid::parse_str(id).ok())
            .and_then(|id| events.get(&id));
        if let Some(order) = order
            && dead_orders.insert(*order)
        {
            *dead_lettered.entry(letter.kind.clone()).or_default() += 1;
            if letter.kind == BROKER_SHELVED {
                shelved_by_broker.insert(*order);
            }
        }
    }
    let stuck = facts.pending_aggregates.len();
    let statuses = refund_statuses(facts, &orders, &refunds_per_order, &shelved_by_broker);
    let unconverged = sorted(
        facts
            .shipping
            .iter()
            .filter(|s| {
                s.applied_version != Some(s.newest_version) || s.applied_address != s.address
            })
            .map(|s| s.order_id),
    );

    let mut lost: Vec<Uuid> = orders
        .iter()
        .filter(|o| !refunds_per_order.contains_key(o) && !dead_orders.contains(o))
        .copied()
        .collect();
    lost.sort();
    let mut doubled: Vec<Uuid> = orders
        .iter()
        .filter(|o| {
            refunds_per_order.get(o).copied().unwrap_or(0) > 1
                || ledger_per_order.get(o).copied().unwrap_or(0) > 1
        })
        .copied()
        .collect();
    doubled.sort();
    let mut refunded_but_shelved: Vec<Uuid> = dead_orders
        .iter()
        .filter(|o| ledger_per_order.contains_key(o) && !refunds_per_order.contains_key(o))
        .copied()
        .collect();
    refunded_but_shelved.sort();
    Report {
        without_cancel,
        refunded_but_shelved,
        refund_statuses: statuses.counts,
        without_status: statuses.missing,
        shelved_by_broker_without_status: statuses.broker_shelved,
        status_mismatch: statuses.mismatch,
        shipping_changed: facts.shipping.len(),
        unconverged,
        canceled: orders.len(),
        refunded: refunds_per_order.len(),
        refunds_in_gateway: ledger_per_order.values().sum(),
        dead_lettered,
        lost,
        doubled,
        stuck: i64::try_from(stuck).unwrap_or(i64::MAX),
    }
}

/// How a dead letter the broker made itself (a consumer crash loop hit the
/// queue's delivery limit) is named.
pub const BROKER_SHELVED: &str = "delivery-limit";

fn sorted(ids: impl Iterator<Item = Uuid>) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = ids.collect();
    ids.sort();
    ids
}

/// The refund statuses of the canceled orders in scope, and what is wrong with them.
struct Statuses {
    counts: BTreeMap<String, usize>,
    missing: Vec<Uuid>,
    broker_shelved: Vec<Uuid>,
    mismatch: Vec<Uuid>,
}

fn refund_statuses(
    facts: &DatabaseFacts,
    orders: &HashSet<Uuid>,
    refunds_per_order: &HashMap<Uuid, usize>,
    shelved_by_broker: &HashSet<Uuid>,
) -> Statuses {
    let status_of = |order: &Uuid| facts.all_canceled.get(order).cloned().flatten();
    let mut counts = BTreeMap::new();
    for order in orders {
        let status = status_of(order).unwrap_or_else(|| NO_STATUS.to_owned());
        *counts.entry(status).or_default() += 1;
    }
    let without = || orders.iter().filter(|o| status_of(o).is_none());
    Statuses {
        counts,
        missing: sorted(
            without()
                .filter(|o| !shelved_by_broker.contains(o))
                .copied(),
        ),
        broker_shelved: sorted(without().filter(|o| shelved_by_broker.contains(o)).copied()),
        mismatch: sorted(
            orders
                .iter()
                .filter(|o| {
                    let refunded = status_of(o).as_deref() == Some(RefundStatus::REFUNDED);
                    let has_status = status_of(o).is_some();
                    has_status && refunded != refunds_per_order.contains_key(o)
                })
                .copied(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::OrderId;

    fn entry(order: Uuid) -> LedgerEntry {
        let key = RefundKey::for_order(OrderId::from_uuid(order));
        LedgerEntry {
            refund_id: format!("rf_{key}"),
            payment_id: "pay".into(),
            amount_cents: 1,
            idempotency_key: key.to_string(),
            status: "succeeded".into(),
            created_at: chrono::Utc::now(),
        }
    }

    fn letter(event: Uuid, kind: &str) -> DeadLetter {
        DeadLetter {
            message_id: Some(event.to_string()),
            kind: kind.into(),
            error: None,
        }
    }

    /// Three canceled orders: (event, order) pairs.
    fn facts(refunded: &[usize], pending: &[usize]) -> (DatabaseFacts, Vec<(Uuid, Uuid)>) {
        let pairs: Vec<(Uuid, Uuid)> = (0..3).map(|_| (Uuid::now_v7(), Uuid::now_v7())).collect();
        let refunded_status = |i: usize| {
            refunded
                .contains(&i)
                .then(|| RefundStatus::REFUNDED.to_owned())
        };
        let facts = DatabaseFacts {
            events: pairs.iter().copied().collect(),
            all_canceled: pairs
                .iter()
                .enumerate()
                .map(|(i, (_, order))| (*order, refunded_status(i)))
                .collect(),
            refund_order_ids: refunded.iter().map(|i| pairs[*i].1).collect(),
            pending_aggregates: pending.iter().map(|i| pairs[*i].1).collect(),
            shipping: Vec::new(),
        };
        (facts, pairs)
    }

    fn ledger_of(pairs: &[(Uuid, Uuid)]) -> Vec<LedgerEntry> {
        pairs.iter().map(|(_, order)| entry(*order)).collect()
    }

    #[test]
    fn a_canceled_order_without_a_refund_status_fails_the_check() {
        let (mut facts, pairs) = facts(&[0, 1], &[]);
        let shelved = letter(pairs[2].0, "permanent");
        let report = check(
            &facts,
            &ledger_of(&pairs[..2]),
            std::slice::from_ref(&shelved),
        );
        assert_eq!(report.without_status, vec![pairs[2].1]);
        assert_eq!(report.refund_statuses.get(NO_STATUS), Some(&1));
        assert!(!report.passed());
        facts
            .all_canceled
            .insert(pairs[2].1, Some(RefundStatus::REFUND_FAILED.to_owned()));
        let report = check(&facts, &ledger_of(&pairs[..2]), &[shelved]);
        assert!(report.passed(), "{report:?}");
        assert_eq!(report.refund_statuses.get("refund_failed"), Some(&1));
        assert_eq!(report.refund_statuses.get("refunded"), Some(&2));
    }

    #[test]
    fn a_refund_status_that_disagrees_with_the_refund_record_fails_the_check() {
        let (mut facts, pairs) = facts(&[0, 1, 2], &[]);
        facts
            .all_canceled
            .insert(pairs[1].1, Some(RefundStatus::REFUND_FAILED.to_owned()));
        let report = check(&facts, &ledger_of(&pairs), &[]);
        assert_eq!(report.status_mismatch, vec![pairs[1].1]);
        assert!(!report.passed());
    }

    #[test]
    fn a_read_model_behind_the_newest_shipping_change_fails_the_check() {
        let (mut facts, pairs) = facts(&[0, 1, 2], &[]);
        let shipping = |applied: i64| ShippingFacts {
            order_id: pairs[0].1,
            address: Some("2 High St".into()),
            newest_version: 3,
            applied_address: Some(
                if applied == 3 {
                    "2 High St"
                } else {
                    "1 Main St"
                }
                .into(),
            ),
            applied_version: Some(applied),
        };
        facts.shipping = vec![shipping(2)];
        let report = check(&facts, &ledger_of(&pairs), &[]);
        assert_eq!(report.unconverged, vec![pairs[0].1]);
        assert!(!report.passed());
        facts.shipping = vec![shipping(3)];
        assert!(check(&facts, &ledger_of(&pairs), &[]).passed());
    }

    #[test]
    fn an_order_neither_refunded_nor_dead_lettered_is_lost() {
        let (facts, pairs) = facts(&[0], &[]);
        let ledger = [entry(pairs[0].1)];
        let report = check(&facts, &ledger, &[letter(pairs[1].0, "permanent")]);
        assert_eq!(report.lost, vec![pairs[2].1]);
        assert_eq!(report.dead_lettered.get("permanent"), Some(&1));
        assert!(!report.passed());
    }

    #[test]
    fn two_ledger_refunds_for_one_order_are_doubled() {
        let (facts, pairs) = facts(&[0, 1, 2], &[]);
        let ledger = [
            entry(pairs[0].1),
            entry(pairs[0].1),
            entry(pairs[1].1),
            entry(pairs[2].1),
        ];
        let report = check(&facts, &ledger, &[]);
        assert_eq!(report.doubled, vec![pairs[0].1]);
        assert!(!report.passed());
    }

    #[test]
    fn a_pending_event_is_stuck_and_a_clean_run_passes() {
        let (facts_pending, _) = facts(&[0, 1, 2], &[1]);
        assert_eq!(check(&facts_pending, &[], &[]).stuck, 1);
        let (clean, pairs) = facts(&[0, 1, 2], &[]);
        let ledger: Vec<_> = pairs.iter().map(|(_, order)| entry(*order)).collect();
        assert!(check(&clean, &ledger, &[]).passed());
    }

    #[test]
    fn a_gateway_refund_whose_message_was_shelved_is_reported() {
        let (facts, pairs) = facts(&[0, 1], &[]);
        let ledger: Vec<_> = pairs.iter().map(|(_, order)| entry(*order)).collect();
        let report = check(&facts, &ledger, &[letter(pairs[2].0, "delivery-limit")]);
        assert_eq!(report.refunded_but_shelved, vec![pairs[2].1]);
        assert!(report.passed(), "shelved is not lost");
    }

    #[test]
    fn a_ledger_refund_for_an_order_nobody_canceled_fails_the_check() {
        let (facts, pairs) = facts(&[0, 1, 2], &[]);
        let mut ledger: Vec<_> = pairs.iter().map(|(_, order)| entry(*order)).collect();
        let forged = entry(Uuid::now_v7());
        ledger.push(forged.clone());
        let report = check(&facts, &ledger, &[]);
        assert_eq!(report.without_cancel, vec![forged.idempotency_key]);
        assert!(report.doubled.is_empty());
        assert!(!report.passed());
    }

    #[test]
    fn a_refund_under_an_event_id_key_counts_for_its_order() {
        let (facts, pairs) = facts(&[0, 1, 2], &[]);
        let mut ledger: Vec<_> = pairs.iter().map(|(_, order)| entry(*order)).collect();
        let mut by_event = entry(pairs[1].1);
        by_event.idempotency_key = pairs[1].0.to_string();
        ledger.push(by_event);
        let report = check(&facts, &ledger, &[]);
        assert_eq!(report.doubled, vec![pairs[1].1]);
        assert!(report.without_cancel.is_empty());
    }
}
