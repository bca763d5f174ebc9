//! Our message contract (DESIGN.md §4) on AMQP properties and headers: how a
//! stored event becomes a message, what a delivery tells us, and how a retry
//! or dead-letter copy is stamped. It knows nothing of where events are
//! stored: callers hand it an [`EventEnvelope`].

use chrono::{DateTime, Utc};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use uuid::Uuid;

use crate::text::truncate_utf8;

/// What the contract says about one event on the wire, besides its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventEnvelope<'a> {
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub event_version: i32,
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub aggregate_version: i64,
    pub content_type: &'a str,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: Option<&'a str>,
}

/// Header names of the contract.
pub mod headers {
    pub const EVENT_VERSION: &str = "x-event-version";
    pub const AGGREGATE_TYPE: &str = "x-aggregate-type";
    pub const AGGREGATE_ID: &str = "x-aggregate-id";
    pub const AGGREGATE_VERSION: &str = "x-aggregate-version";
    pub const OCCURRED_AT: &str = "x-occurred-at";
    pub const ATTEMPT: &str = "x-attempt";
    pub const FIRST_FAILED_AT: &str = "x-first-failed-at";
    pub const LAST_ERROR: &str = "x-last-error";
    pub const ERROR_KIND: &str = "x-error-kind";
    pub const CONSUMER: &str = "x-consumer";
    pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
    pub const ORIGINAL_EXCHANGE: &str = "x-original-exchange";
    /// Set by RabbitMQ when it dead-letters; never copied into a republished
    /// message, or RabbitMQ may see a dead-letter cycle and drop it.
    pub const X_DEATH: &str = "x-death";
}

pub const CONTENT_TYPE_JSON: &str = "application/json";
const PERSISTENT: u8 = 2;
const LAST_ERROR_MAX_BYTES: usize = 1024;

/// The properties an event is published with.
pub fn properties_for<'a>(event: impl Into<EventEnvelope<'a>>, app_id: &str) -> BasicProperties {
    let event = event.into();
    let mut table = FieldTable::default();
    table.insert(
        headers::EVENT_VERSION.into(),
        AMQPValue::LongInt(event.event_version),
    );
    table.insert(headers::AGGREGATE_TYPE.into(), text(event.aggregate_type));
    table.insert(headers::AGGREGATE_ID.into(), text(event.aggregate_id));
    table.insert(
        headers::AGGREGATE_VERSION.into(),
        AMQPValue::LongLongInt(event.aggregate_version),
    );
    table.insert(
        headers::OCCURRED_AT.into(),
        text(&event.occurred_at.to_rfc3339()),
    );
    let mut properties = BasicProperties::default()
        .with_message_id(event.event_id.to_string().into())
        .with_type(short(event.event_type))
        .with_content_type(short(event.content_type))
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(u64::try_from(event.occurred_at.timestamp()).unwrap_or(0))
        .with_app_id(short(app_id))
        .with_headers(table);
    if let Some(correlation_id) = event.correlation_id {
        properties = properties.with_correlation_id(short(correlation_id));
    }
    properties
}

/// Why a delivery failed, as stamped on its retry or dead-letter copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Transient,
    Permanent,
    Poison,
}

impl ErrorKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Permanent => "permanent",
            Self::Poison => "poison",
        }
    }
}

/// The failure facts stamped on a copy.
#[derive(Debug, Clone)]
pub struct FailureStamp<'a> {
    pub attempt: i64,
    pub kind: ErrorKind,
    pub error: &'a str,
    pub consumer: &'a str,
    pub now: DateTime<Utc>,
}

/// The properties of a retry or dead-letter copy: the original's properties
/// and headers, minus `x-death`, plus our failure headers. The first failure's
/// time and the original routing key survive every later attempt.
pub fn failure_copy(
    original: &BasicProperties,
    original_exchange: &str,
    original_routing_key: &str,
    stamp: &FailureStamp<'_>,
) -> BasicProperties {
    let mut table = FieldTable::default();
    if let Some(existing) = original.headers() {
        for (key, value) in existing.inner() {
            if key.as_str() != headers::X_DEATH {
                table.insert(key.clone(), value.clone());
            }
        }
    }
    let keep_or = |table: &mut FieldTable, key: &str, value: &str| {
        if !table.contains_key(key) {
            table.insert(key.into(), text(value));
        }
    };
    keep_or(
        &mut table,
        headers::FIRST_FAILED_AT,
        &stamp.now.to_rfc3339(),
    );
    keep_or(
        &mut table,
        headers::ORIGINAL_ROUTING_KEY,
        original_routing_key,
    );
    keep_or(&mut table, headers::ORIGINAL_EXCHANGE, original_exchange);
    table.insert(
        headers::ATTEMPT.into(),
        AMQPValue::LongLongInt(stamp.attempt),
    );
    table.insert(headers::ERROR_KIND.into(), text(stamp.kind.as_str()));
    table.insert(
        headers::LAST_ERROR.into(),
        text(&truncate_utf8(stamp.error, LAST_ERROR_MAX_BYTES)),
    );
    table.insert(headers::CONSUMER.into(), text(stamp.consumer));
    let mut copy = original
        .clone()
        .with_headers(table)
        .with_delivery_mode(PERSISTENT);
    if copy.expiration().is_some() {
        // A per-message TTL would let the copy expire out of the dead-letter queue.
        copy = BasicProperties::default()
            .with_headers(copy.headers().clone().unwrap_or_default())
            .with_delivery_mode(PERSISTENT);
        copy = copy_basic_fields(original, copy);
    }
    copy
}

fn copy_basic_fields(from: &BasicProperties, mut to: BasicProperties) -> BasicProperties {
    if let Some(v) = from.message_id() {
        to = to.with_message_id(v.clone());
    }
    if let Some(v) = from.kind() {
        to = to.with_type(v.clone());
    }
    if let Some(v) = from.content_type() {
        to = to.with_content_type(v.clone());
    }
    if let Some(v) = from.correlation_id() {
        to = to.with_correlation_id(v.clone());
    }
    if let Some(v) = from.timestamp() {
        to = to.with_timestamp(*v);
    }
    if let Some(v) = from.app_id() {
        to = to.with_app_id(v.clone());
    }
    to
}

/// A header as text, whatever string type the sender used.
pub fn header_text(properties: &BasicProperties, key: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A header as an integer, whatever integer type the sender used.
pub fn header_int(properties: &BasicProperties, key: &str) -> Option<i64> {
    match properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

/// The ids every log line about a message carries: its event id (message
/// id) and its order (`x-aggregate-id`), `-` where the message lacks one.
pub struct LogIds {
    pub event_id: String,
    pub order_id: String,
}

impl LogIds {
    pub fn of(properties: &BasicProperties) -> Self {
        Self {
            event_id: properties
                .message_id()
                .as_ref()
                .map_or_else(|| "-".to_owned(), ToString::to_string),
            order_id: header_text(properties, headers::AGGREGATE_ID)
                .unwrap_or_else(|| "-".to_owned()),
        }
    }
}

/// Headers courier's failure copies add; a replay drops them, so the
/// replayed message starts with a fresh attempt count.
pub const FAILURE_HEADERS: [&str; 7] = [
    headers::ATTEMPT,
    headers::FIRST_FAILED_AT,
    headers::LAST_ERROR,
    headers::ERROR_KIND,
    headers::CONSUMER,
    headers::ORIGINAL_ROUTING_KEY,
    headers::ORIGINAL_EXCHANGE,
];

/// Headers RabbitMQ sets when it dead-letters or redelivers; never
/// republished (a copied `x-death` can make RabbitMQ drop the message as a
/// dead-letter cycle).
const BROKER_HEADERS: [&str; 5] = [
    headers::X_DEATH,
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-delivery-count",
];

/// When and by whom a dead letter was replayed (`courier dlq replay`).
pub const REPLAYED_AT: &str = "x-replayed-at";
pub const REPLAYED_BY: &str = "x-replayed-by";

/// The reason of RabbitMQ's most recent dead-lettering of this message
/// (`expired`, `delivery_limit`, `rejected`, `maxlen`), if it has one: the
/// first entry of `x-death` is the latest.
pub fn last_death_reason(properties: &BasicProperties) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = properties
        .headers()
        .as_ref()?
        .inner()
        .get(headers::X_DEATH)?
    else {
        return None;
    };
    let AMQPValue::FieldTable(latest) = deaths.as_slice().first()? else {
        return None;
    };
    match latest.inner().get("reason")? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// How many times this message failed before, for its retry budget.
///
/// A message comes back to its work queue from a delay tier only by
/// expiring there, and RabbitMQ records that as the latest `x-death` reason
/// `expired`: then its `x-attempt` counts. A message that carries failure
/// headers but did not come back that way was moved back from the
/// dead-letter queue by an operator (the management UI's "Move messages",
/// a shovel, a republish by hand): it starts a fresh count, instead of being
/// dead-lettered again at its first failure. Tiers only ever receive our own
/// copies, which carry no `x-death`, so nothing else ends with `expired`.
pub fn previous_failures(properties: &BasicProperties) -> i64 {
    if last_death_reason(properties).as_deref() == Some("expired") {
        header_int(properties, headers::ATTEMPT).unwrap_or(0).max(0)
    } else {
        0
    }
}

/// The properties a replayed dead letter is published with: the same message
/// id and contract headers, without courier's failure headers or RabbitMQ's
/// death records, stamped with who replayed it and when.
pub fn replay_copy(original: &BasicProperties, by: &str, now: DateTime<Utc>) -> BasicProperties {
    let mut table = FieldTable::default();
    if let Some(existing) = original.headers() {
        for (key, value) in existing.inner() {
            let key_str = key.as_str();
            if !FAILURE_HEADERS.contains(&key_str) && !BROKER_HEADERS.contains(&key_str) {
                table.insert(key.clone(), value.clone());
            }
        }
    }
    table.insert(REPLAYED_AT.into(), text(&now.to_rfc3339()));
    table.insert(REPLAYED_BY.into(), text(by));
    let copy = BasicProperties::default()
        .with_headers(table)
        .with_delivery_mode(PERSISTENT);
    copy_basic_fields(original, copy)
}

/// Headers as JSON, for operators: strings as text, numbers as numbers,
/// nested tables and arrays (`x-death`) as objects and arrays.
pub fn headers_json(properties: &BasicProperties) -> serde_json::Value {
    properties
        .headers()
        .as_ref()
        .map_or_else(|| serde_json::json!({}), table_json)
}

fn table_json(table: &FieldTable) -> serde_json::Value {
    serde_json::Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), value_json(v)))
            .collect(),
    )
}

fn value_json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        AMQPValue::Boolean(b) => J::from(*b),
        AMQPValue::LongString(s) => J::from(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => J::from(s.as_str()),
        AMQPValue::FieldArray(items) => J::Array(items.as_slice().iter().map(value_json).collect()),
        AMQPValue::FieldTable(table) => table_json(table),
        AMQPValue::Timestamp(t) => J::from(*t),
        AMQPValue::Float(x) => J::from(*x),
        AMQPValue::Double(x) => J::from(*x),
        AMQPValue::ByteArray(bytes) => {
            J::from(String::from_utf8_lossy(bytes.as_slice()).into_owned())
        }
        AMQPValue::Void => J::Null,
        AMQPValue::DecimalValue(d) => J::from(format!("{d:?}")),
        AMQPValue::ShortShortInt(v) => J::from(*v),
        AMQPValue::ShortShortUInt(v) => J::from(*v),
        AMQPValue::ShortInt(v) => J::from(*v),
        AMQPValue::ShortUInt(v) => J::from(*v),
        AMQPValue::LongInt(v) => J::from(*v),
        AMQPValue::LongUInt(v) => J::from(*v),
        AMQPValue::LongLongInt(v) => J::from(*v),
    }
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.to_owned()))
}

/// A short string, cut to AMQP's 255-byte limit instead of panicking on a
/// long value from a caller.
fn short(value: &str) -> ShortString {
    ShortString::from(truncate_utf8(value, 255))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn original() -> BasicProperties {
        let mut table = FieldTable::default();
        table.insert("x-death".into(), AMQPValue::FieldArray(Vec::new().into()));
        table.insert(headers::AGGREGATE_ID.into(), text("order-1"));
        BasicProperties::default()
            .with_message_id("m-1".into())
            .with_type("order.canceled".into())
            .with_headers(table)
    }

    fn stamp(attempt: i64, error: &str) -> FailureStamp<'_> {
        FailureStamp {
            attempt,
            kind: ErrorKind::Transient,
            error,
            consumer: "refunds",
            now: Utc::now(),
        }
    }

    #[test]
    fn a_failure_copy_drops_x_death_and_keeps_the_contract_headers() {
        let copy = failure_copy(
            &original(),
            "orders.events",
            "order.canceled",
            &stamp(1, "503"),
        );
        let Some(table) = copy.headers() else {
            panic!("headers are set");
        };
        assert!(!table.contains_key("x-death"));
        assert_eq!(
            header_text(&copy, headers::AGGREGATE_ID).as_deref(),
            Some("order-1")
        );
        assert_eq!(header_int(&copy, headers::ATTEMPT), Some(1));
        assert_eq!(
            header_text(&copy, headers::ERROR_KIND).as_deref(),
            Some("transient")
        );
        assert_eq!(copy.message_id().as_ref().map(|m| m.as_str()), Some("m-1"));
    }

    #[test]
    fn the_first_failure_time_and_origin_survive_later_attempts() {
        let first = failure_copy(
            &original(),
            "orders.events",
            "order.canceled",
            &stamp(1, "a"),
        );
        let second = failure_copy(&first, "", "refunds", &stamp(2, "b"));
        assert_eq!(
            header_text(&second, headers::FIRST_FAILED_AT),
            header_text(&first, headers::FIRST_FAILED_AT)
        );
        assert_eq!(
            header_text(&second, headers::ORIGINAL_ROUTING_KEY).as_deref(),
            Some("order.canceled")
        );
        assert_eq!(header_int(&second, headers::ATTEMPT), Some(2));
        assert_eq!(
            header_text(&second, headers::LAST_ERROR).as_deref(),
            Some("b")
        );
    }

    fn with_death(reason: &str, attempt: i64) -> BasicProperties {
        let mut death = FieldTable::default();
        death.insert("reason".into(), text(reason));
        death.insert("queue".into(), text("refunds.retry.1s"));
        let mut table = FieldTable::default();
        table.insert(
            headers::X_DEATH.into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        table.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(attempt));
        BasicProperties::default().with_headers(table)
    }

    #[test]
    fn only_a_message_back_from_a_delay_tier_keeps_its_attempt_count() {
        assert_eq!(previous_failures(&with_death("expired", 2)), 2);
        // Broker-dead-lettered for its delivery limit, then moved back.
        assert_eq!(previous_failures(&with_death("delivery_limit", 2)), 0);
        // Copied into the dead-letter queue by the consumer, then moved back.
        let moved_back = failure_copy(&original(), "", "refunds", &stamp(4, "503"));
        assert_eq!(header_int(&moved_back, headers::ATTEMPT), Some(4));
        assert_eq!(previous_failures(&moved_back), 0);
        assert_eq!(previous_failures(&BasicProperties::default()), 0);
    }

    #[test]
    fn a_replayed_copy_keeps_its_message_id_and_drops_every_failure_header() {
        let dead = failure_copy(
            &with_death("delivery_limit", 3).with_message_id("m-9".into()),
            "",
            "refunds",
            &stamp(4, "503"),
        );
        let replayed = replay_copy(&dead, "courier-operator", Utc::now());
        assert_eq!(
            replayed.message_id().as_ref().map(|m| m.as_str()),
            Some("m-9")
        );
        let headers = headers_json(&replayed);
        for gone in FAILURE_HEADERS.iter().chain(BROKER_HEADERS.iter()) {
            assert!(headers.get(*gone).is_none(), "{gone} in {headers}");
        }
        assert_eq!(headers[REPLAYED_BY], "courier-operator");
        assert_eq!(replayed.delivery_mode(), &Some(PERSISTENT));
    }

    #[test]
    fn the_last_error_is_cut_to_one_kib() {
        let long = "e".repeat(5000);
        let copy = failure_copy(&original(), "x", "y", &stamp(1, &long));
        assert_eq!(
            header_text(&copy, headers::LAST_ERROR).map(|e| e.len()),
            Some(1024)
        );
    }
}
