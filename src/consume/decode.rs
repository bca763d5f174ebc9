//! A delivery becomes a typed message here, or is poison with a reason.

use lapin::BasicProperties;
use uuid::Uuid;

use crate::{
    amqp::envelope::{self, CONTENT_TYPE_JSON},
    domain::IncomingEvent,
};

/// A delivery that cannot be handled, and what the failure copy needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    pub reason: String,
    /// How many times this message failed before, as for [`Decoded`].
    pub previous_failures: i64,
}

/// A delivery we can hand to a handler.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub message_id: Uuid,
    pub event: IncomingEvent,
    /// How many times this message failed before: our `x-attempt` header when
    /// it came back from a delay tier, 0 when an operator moved it back from
    /// the dead-letter queue ([`envelope::previous_failures`]).
    pub previous_failures: i64,
}

/// Decodes a delivery's properties and body; a poison message comes back
/// with its reason and its previous failures, read once here.
pub fn decode(
    properties: &BasicProperties,
    body: &[u8],
    max_body_bytes: usize,
) -> Result<Decoded, Poison> {
    let previous_failures = envelope::previous_failures(properties);
    decode_event(properties, body, max_body_bytes)
        .map(|(message_id, event)| Decoded {
            message_id,
            event,
            previous_failures,
        })
        .map_err(|reason| Poison {
            reason,
            previous_failures,
        })
}

fn decode_event(
    properties: &BasicProperties,
    body: &[u8],
    max_body_bytes: usize,
) -> Result<(Uuid, IncomingEvent), String> {
    if body.len() > max_body_bytes {
        return Err(format!(
            "body of {} bytes exceeds the limit of {max_body_bytes} bytes",
            body.len()
        ));
    }
    match properties.content_type().as_ref().map(|c| c.as_str()) {
        Some(CONTENT_TYPE_JSON) => {}
        Some(other) => {
            return Err(format!(
                "unsupported content type `{other}`; expected `{CONTENT_TYPE_JSON}`"
            ));
        }
        None => {
            return Err(format!(
                "missing content type; expected `{CONTENT_TYPE_JSON}`"
            ));
        }
    }
    let Some(message_id) = properties.message_id().as_ref() else {
        return Err("missing message id".to_owned());
    };
    let message_id = Uuid::parse_str(message_id.as_str())
        .map_err(|_| format!("message id `{message_id}` is not a UUID"))?;
    let Some(event_type) = properties.kind().as_ref() else {
        return Err("missing message type".to_owned());
    };
    let event = IncomingEvent::decode(event_type.as_str(), body).map_err(|e| e.to_string())?;
    Ok((message_id, event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props() -> BasicProperties {
        BasicProperties::default()
            .with_content_type(CONTENT_TYPE_JSON.into())
            .with_message_id("0190f5c4-7f5e-7a2b-9c1d-2e3f4a5b6c7d".into())
            .with_type("order.canceled".into())
    }

    #[test]
    fn poison_reasons_name_what_is_wrong() {
        let reason = |p: BasicProperties, body: &[u8]| {
            decode(&p, body, 64)
                .err()
                .map(|poison| poison.reason)
                .unwrap_or_default()
        };
        assert!(reason(props(), b"{oops").contains("not a valid `order.canceled`"));
        assert!(
            reason(
                BasicProperties::default().with_content_type(CONTENT_TYPE_JSON.into()),
                b"{}"
            )
            .contains("missing message id")
        );
        assert!(
            reason(props().with_type("order.exploded".into()), b"{}")
                .contains("unknown event type")
        );
        assert!(
            reason(props().with_content_type("text/plain".into()), b"{}")
                .contains("unsupported content type")
        );
        assert!(reason(props(), &[b' '; 65]).contains("exceeds the limit"));
        assert!(reason(props().with_message_id("not-a-uuid".into()), b"{}").contains("not a UUID"));
    }

    #[test]
    fn poison_back_from_a_delay_tier_keeps_the_attempts_it_already_failed() {
        use lapin::types::{AMQPValue, FieldTable, LongString};
        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString(LongString::from("expired")),
        );
        let mut table = FieldTable::default();
        table.insert(
            envelope::headers::X_DEATH.into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        table.insert(envelope::headers::ATTEMPT.into(), AMQPValue::LongLongInt(2));
        let poison = decode(&props().with_headers(table), b"{oops", 64).err();
        assert_eq!(poison.map(|p| p.previous_failures), Some(2));
    }
}
