//! The checker: compares ground truth after a run. Canceled orders vs refunds
//! in our database vs the gateway's ledger vs dead letters vs pending outbox
//! rows. A run passes only with nothing lost, nothing doubled, nothing stuck.

use std::collections::{BTreeMap, HashMap, HashSet};

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
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
    domain::{OrderCanceled, OrderState, RefundKey},
    gateway::client::{GatewayClient, LedgerEntry},
    handlers::refund,
    store::schema,
};

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
}

impl Report {
    pub fn dead_total(&self) -> usize {
        self.dead_lettered.values().sum()
    }

    /// Every cancellation has an outcome, none was doubled or left in the
    /// outbox, and no money moved for an order nobody canceled.
    pub fn passed(&self) -> bool {
        self.lost.is_empty()
            && self.doubled.is_empty()
            && self.without_cancel.is_empty()
            && self.stuck == 0
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
            "delivery-limit".to_owned()
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

/// What our database says: each canceled order's event, its refunds, and
/// the events still pending. Load it *before* reading the gateway's ledger and
/// the dead letters: a refund committed in between is then in the ledger too,
/// never in our database alone.
#[derive(Debug, Clone, Default)]
pub struct DatabaseFacts {
    /// Event id -> order id, for every `order.canceled` in scope.
    events: HashMap<Uuid, Uuid>,
    /// Every canceled order in the database, in scope or not: a ledger refund
    /// for anything else moved money nobody decided on.
    all_canceled: HashSet<Uuid>,
    refund_order_ids: Vec<Uuid>,
    pending_event_ids: Vec<Uuid>,
}

impl DatabaseFacts {
    /// Reads every canceled order in the database (or only `scope`, if given).
    pub async fn load(
        db: &mut AsyncPgConnection,
        scope: Option<&HashSet<Uuid>>,
    ) -> Result<Self, diesel::result::Error> {
        use schema::{orders, outbox, refunds};
        let events: Vec<(Uuid, String)> = outbox::table
            .filter(outbox::event_type.eq(OrderCanceled::TYPE))
            .select((outbox::event_id, outbox::aggregate_id))
            .load(db)
            .await?;
        let events = events
            .into_iter()
            .filter_map(|(event, order)| Uuid::parse_str(&order).ok().map(|o| (event, o)))
            .filter(|(_, order)| scope.is_none_or(|s| s.contains(order)))
            .collect();
        let all_canceled = orders::table
            .filter(orders::state.eq(OrderState::Canceled.as_str()))
            .select(orders::id)
            .load::<Uuid>(db)
            .await?
            .into_iter()
            .collect();
        let refund_order_ids = refunds::table.select(refunds::order_id).load(db).await?;
        let pending_event_ids = outbox::table
            .filter(outbox::published_at.is_null())
            .select(outbox::event_id)
            .load(db)
            .await?;
        Ok(Self {
            events,
            all_canceled,
            refund_order_ids,
            pending_event_ids,
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
            Some(order) if facts.all_canceled.contains(&order) => {
                if orders.contains(&order) {
                    *ledger_per_order.entry(order).or_default() += 1;
                }
            }
            _ => without_cancel.push(entry.idempotency_key.clone()),
        }
    }
    let mut dead_lettered = BTreeMap::new();
    let mut dead_orders = HashSet::new();
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
        }
    }
    let stuck = facts
        .pending_event_ids
        .iter()
        .filter(|e| events.contains_key(e))
        .count();

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
        canceled: orders.len(),
        refunded: refunds_per_order.len(),
        refunds_in_gateway: ledger_per_order.values().sum(),
        dead_lettered,
        lost,
        doubled,
        stuck: i64::try_from(stuck).unwrap_or(i64::MAX),
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
        let facts = DatabaseFacts {
            events: pairs.iter().copied().collect(),
            all_canceled: pairs.iter().map(|(_, order)| *order).collect(),
            refund_order_ids: refunded.iter().map(|i| pairs[*i].1).collect(),
            pending_event_ids: pending.iter().map(|i| pairs[*i].0).collect(),
        };
        (facts, pairs)
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
