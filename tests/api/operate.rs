//! Operating courier: the `courier` CLI against real queues (dead letters
//! listed, shown, replayed and purged with an audit; topology drift named and
//! applied away; legacy queues migrated without losing a message), a policy
//! change taking effect on a running pipeline, and a dead letter moved back
//! through the management UI's shovel.

use std::{process::Stdio, time::Duration};

use courier::{
    amqp::{
        drift::{self, Drift},
        envelope::{self, ErrorKind, FailureStamp, headers},
        management::Management,
        provision,
    },
    domain::OrderId,
    store::dead_letter_actions,
};
use figment::providers::Serialized;
use lapin::{
    BasicProperties,
    options::{QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::helpers::{TestEnv, consumer_stats, json_properties, wait_until};

const SETTLE: Duration = Duration::from_secs(30);

/// What one run of the `courier` binary printed, and its exit code.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.stdout)
            .map_err(|e| anyhow::anyhow!("{e}: stdout {} stderr {}", self.stdout, self.stderr))
    }
}

/// Runs `courier ARGS` against `env`'s vhost and database as its operator,
/// with `stdin` on standard input.
async fn courier(env: &TestEnv, args: &[&str], stdin: &str) -> anyhow::Result<Ran> {
    let amqp = &env.settings.amqp;
    let mut vars = courier::demo::child_env(&env.settings);
    vars.extend([
        (
            "COURIER__AMQP__OPERATOR__USER".to_owned(),
            amqp.operator.user.clone(),
        ),
        (
            "COURIER__AMQP__OPERATOR__PASSWORD".to_owned(),
            amqp.operator.password.expose_secret().to_owned(),
        ),
        (
            "COURIER__AMQP__MANAGEMENT_URL".to_owned(),
            amqp.management_url.clone(),
        ),
        (
            "COURIER_CONFIG_DIR".to_owned(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/config").to_owned(),
        ),
    ]);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(args)
        .envs(vars)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    if let Some(mut input) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        input.write_all(stdin.as_bytes()).await?;
    }
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await??;
    Ok(Ran {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Cancels an order paid with `payment_id`, relays its event, and waits
/// until its refund is dead-lettered; returns the order and event ids.
async fn dead_lettered_refund(
    env: &TestEnv,
    payment_id: &str,
    dead_before: u32,
) -> anyhow::Result<(OrderId, String)> {
    let (order_id, event_id) = env.cancel_new_order(payment_id).await;
    env.relay().relay_once().await?;
    wait_until("the refund is dead-lettered", SETTLE, async || {
        env.queue_depth("refunds.dead").await > dead_before
    })
    .await;
    Ok((order_id, event_id.to_string()))
}

/// Waits until `queue` holds `n` ready messages: what a `basic.get` holder
/// hands back returns to a quorum queue a moment after the nack.
async fn holds(env: &TestEnv, queue: &str, n: u32, why: &str) {
    wait_until(why, SETTLE, async || env.queue_depth(queue).await == n).await;
}

async fn audit_rows(
    env: &TestEnv,
    event_id: &str,
) -> anyhow::Result<Vec<dead_letter_actions::ActionRow>> {
    let mut conn = env.conn().await;
    Ok(dead_letter_actions::for_message(&mut conn, event_id).await?)
}

#[tokio::test]
async fn dlq_list_shows_each_dead_letter_with_its_reason_and_leaves_it_there() -> anyhow::Result<()>
{
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default(
            "gateway_simulator.failing_payment_ids",
            ["pay-never-list"],
        ))
    })
    .await;
    let consumer = env.start_consumer().await;
    let (order_id, event_id) = dead_lettered_refund(&env, "pay-never-list", 0).await?;
    env.publish_raw("refunds", b"{not json", json_properties())
        .await;
    wait_until("the poison message is dead-lettered", SETTLE, async || {
        env.queue_depth("refunds.dead").await == 2
    })
    .await;

    let listed = courier(&env, &["dlq", "list", "refunds", "--json"], "").await?;
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    let letters = listed.json()?;
    let letters = letters.as_array().cloned().unwrap_or_default();
    assert_eq!(letters.len(), 2, "{letters:?}");
    let permanent = letters
        .iter()
        .find(|l| l["event_id"] == event_id.as_str())
        .ok_or_else(|| anyhow::anyhow!("{event_id} not listed: {letters:?}"))?;
    assert_eq!(permanent["error_kind"], "permanent");
    assert_eq!(permanent["order_id"], order_id.to_string().as_str());
    assert_eq!(permanent["event_type"], "order.canceled");
    assert_eq!(permanent["attempts"], 1);
    assert!(permanent["first_failed_at"].is_string());
    assert!(
        permanent["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("422")),
        "{permanent}"
    );
    assert!(letters.iter().any(|l| l["error_kind"] == "poison"));

    let table = courier(&env, &["dlq", "list"], "").await?;
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    assert!(
        table.stdout.contains("LAST ERROR")
            && table.stdout.contains(&event_id)
            && table.stdout.contains("2 dead letter(s)"),
        "{}",
        table.stdout
    );
    holds(&env, "refunds.dead", 2, "listing takes nothing").await;
    consumer.stop().await
}

#[tokio::test]
async fn dlq_show_prints_the_headers_and_body_of_one_dead_letter() -> anyhow::Result<()> {
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default(
            "gateway_simulator.failing_payment_ids",
            ["pay-never-show"],
        ))
    })
    .await;
    let consumer = env.start_consumer().await;
    let (order_id, event_id) = dead_lettered_refund(&env, "pay-never-show", 0).await?;

    let shown = courier(&env, &["dlq", "show", &event_id, "--json"], "").await?;
    assert_eq!(shown.code, Some(0), "{}", shown.stderr);
    let detail = shown.json()?;
    assert_eq!(detail["queue"], "refunds.dead");
    assert_eq!(detail["headers"][headers::ERROR_KIND], "permanent");
    assert_eq!(detail["headers"][headers::CONSUMER], "refunds");
    assert_eq!(detail["body"]["order_id"], order_id.to_string().as_str());
    assert_eq!(detail["properties"]["message_id"], event_id.as_str());

    let missing = courier(
        &env,
        &["dlq", "show", &uuid::Uuid::now_v7().to_string()],
        "",
    )
    .await?;
    assert_eq!(missing.code, Some(1), "{}", missing.stdout);
    assert!(
        missing.stderr.contains("no dead letter"),
        "{}",
        missing.stderr
    );
    holds(&env, "refunds.dead", 1, "showing takes nothing").await;
    consumer.stop().await
}

#[tokio::test]
async fn replaying_a_dead_letter_after_the_payment_recovered_refunds_it_once_with_a_fresh_attempt_count()
-> anyhow::Result<()> {
    // `fail-4x-…` fails its first four refund attempts: the first try and
    // all three tiers, so it is shelved as exhausted; the fifth succeeds.
    let env = TestEnv::new().await;
    let consumer = env.start_consumer().await;
    let (order_id, event_id) = dead_lettered_refund(&env, "fail-4x-replay", 0).await?;

    let dry = courier(
        &env,
        &["dlq", "replay", "refunds", "--all", "--dry-run", "--json"],
        "",
    )
    .await?;
    assert_eq!(dry.code, Some(0), "{}", dry.stderr);
    let would = dry.json()?;
    assert_eq!(would[0]["done"], "would replay", "{would}");
    assert_eq!(would[0]["error_kind"], "transient");
    assert!(would[0]["note"].is_null(), "not refunded yet: {would}");
    holds(&env, "refunds.dead", 1, "a dry run moves nothing").await;
    assert!(audit_rows(&env, &event_id).await?.is_empty());

    let replayed = courier(&env, &["dlq", "replay", "refunds", "--id", &event_id], "").await?;
    assert_eq!(replayed.code, Some(0), "{}", replayed.stderr);
    assert!(replayed.stdout.contains("replayed"), "{}", replayed.stdout);
    wait_until("the replayed refund is made", SETTLE, async || {
        env.count(&format!(
            "SELECT count(*) FROM refunds WHERE order_id = '{order_id}'"
        ))
        .await
            == 1
    })
    .await;
    assert_eq!(env.queue_depth("refunds.dead").await, 0);
    // A fresh count: had it kept x-attempt = 4, its fifth try would not
    // have happened; it would have been shelved at once.
    assert_eq!(env.gateway_ledger().await.len(), 1);
    let audit = audit_rows(&env, &event_id).await?;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, "replay");
    assert_eq!(audit[0].target_queue.as_deref(), Some("refunds"));
    assert_eq!(audit[0].outcome, "replayed");
    assert!(
        audit[0]
            .operator
            .starts_with(&env.settings.amqp.operator.user)
    );

    // The same message dead-lettered again (a duplicate of an old shelving),
    // replayed again: harmless, and the replay says so.
    let original = event_properties_of(&env, &event_id).await?;
    env.publish_raw("refunds.dead", original.1.as_bytes(), original.0)
        .await;
    let harmless = courier(&env, &["dlq", "replay", "refunds", "--all", "--json"], "").await?;
    assert_eq!(harmless.code, Some(0), "{}", harmless.stderr);
    let outcome = harmless.json()?;
    assert!(
        outcome[0]["note"]
            .as_str()
            .is_some_and(|n| n.contains("already")),
        "{outcome}"
    );
    wait_until("the replayed duplicate is absorbed", SETTLE, async || {
        consumer_stats(&consumer).await["refunds"].duplicates >= 1
    })
    .await;
    assert_eq!(env.gateway_ledger().await.len(), 1, "no money moved twice");
    assert_eq!(env.count("SELECT count(*) FROM refunds").await, 1);
    assert_eq!(audit_rows(&env, &event_id).await?.len(), 2);
    consumer.stop().await
}

/// A dead-letter copy of `event_id`'s event as the consumer would have made
/// it (exhausted, four attempts), with its body.
async fn event_properties_of(
    env: &TestEnv,
    event_id: &str,
) -> anyhow::Result<(BasicProperties, String)> {
    let id = uuid::Uuid::parse_str(event_id)?;
    let mut conn = env.conn().await;
    let row = courier::store::outbox::find_by_event_id(&mut conn, id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no outbox row for {event_id}"))?;
    let properties = envelope::properties_for(&row, "courier-test");
    let dead = envelope::failure_copy(
        &properties,
        "orders.events",
        "order.canceled",
        &FailureStamp {
            attempt: 4,
            kind: ErrorKind::Transient,
            error: "gateway answered 503",
            consumer: "refunds",
            now: chrono::Utc::now(),
        },
    );
    Ok((dead, row.payload.to_string()))
}

#[tokio::test]
async fn purge_asks_first_and_keeps_each_purged_message_in_the_audit() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let consumer = env.start_consumer().await;
    let properties = json_properties();
    let event_id = properties
        .message_id()
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    env.publish_raw("refunds", b"{poison body", properties)
        .await;
    wait_until("the poison message is dead-lettered", SETTLE, async || {
        env.queue_depth("refunds.dead").await == 1
    })
    .await;

    let declined = courier(&env, &["dlq", "purge", "refunds", "--all"], "no\n").await?;
    assert_eq!(declined.code, Some(1), "{}", declined.stderr);
    assert!(
        declined.stderr.contains("Type `yes`"),
        "{}",
        declined.stderr
    );
    assert!(
        declined.stderr.contains("nothing purged"),
        "{}",
        declined.stderr
    );
    holds(&env, "refunds.dead", 1, "a declined purge takes nothing").await;

    let confirmed = courier(
        &env,
        &["dlq", "purge", "refunds.dead", "--id", &event_id],
        "yes\n",
    )
    .await?;
    assert_eq!(confirmed.code, Some(0), "{}", confirmed.stderr);
    assert_eq!(env.queue_depth("refunds.dead").await, 0);
    let audit = audit_rows(&env, &event_id).await?;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, "purge");
    assert_eq!(audit[0].error_kind.as_deref(), Some("poison"));
    let body = env
        .count(&format!(
            "SELECT count(*) FROM dead_letter_actions WHERE message_id = '{event_id}' AND body = convert_to('{{poison body', 'UTF8')"
        ))
        .await;
    assert_eq!(body, 1, "the purged body is kept");

    env.publish_raw("refunds", b"{more poison", json_properties())
        .await;
    wait_until(
        "the second poison message is dead-lettered",
        SETTLE,
        async || env.queue_depth("refunds.dead").await == 1,
    )
    .await;
    let unasked = courier(
        &env,
        &["dlq", "purge", "refunds", "--all", "--yes", "--json"],
        "",
    )
    .await?;
    assert_eq!(unasked.code, Some(0), "{}", unasked.stderr);
    assert_eq!(unasked.json()?[0]["done"], "purged");
    assert_eq!(env.queue_depth("refunds.dead").await, 0);
    consumer.stop().await
}

#[tokio::test]
async fn topology_check_names_every_difference_and_apply_puts_it_right() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let clean = courier(&env, &["topology", "check"], "").await?;
    assert_eq!(clean.code, Some(0), "{}{}", clean.stdout, clean.stderr);
    assert!(
        clean.stdout.contains("matches the topology"),
        "{}",
        clean.stdout
    );

    env.channel
        .queue_unbind(
            "refunds".into(),
            "orders.events".into(),
            "order.canceled".into(),
            FieldTable::default(),
        )
        .await?;
    env.channel
        .queue_delete(
            "notifications.retry.400ms".into(),
            QueueDeleteOptions::default(),
        )
        .await?;
    let operator = Management::as_operator(&env.settings.amqp)?;
    let plan = env.topology.plan();
    set_delivery_limit(&operator, &env.settings.amqp.vhost, &plan, "refunds", 3).await?;

    let drifted = courier(&env, &["topology", "check"], "").await?;
    assert_eq!(drifted.code, Some(1), "{}", drifted.stdout);
    for named in [
        "missing binding `orders.events` -> `refunds` with key `order.canceled`",
        "missing queue `notifications.retry.400ms`",
        "missing binding `notifications.failures` -> `notifications.retry.400ms`",
        "policy drift `courier.refunds`: delivery-limit is 3, expected 10",
    ] {
        assert!(
            drifted.stdout.contains(named),
            "{named} in {}",
            drifted.stdout
        );
    }
    let json = courier(&env, &["topology", "check", "--json"], "").await?;
    assert_eq!(json.json()?["in_sync"], false);

    let applied = courier(&env, &["topology", "apply"], "").await?;
    assert_eq!(applied.code, Some(0), "{}", applied.stderr);
    let again = courier(&env, &["topology", "check"], "").await?;
    assert_eq!(again.code, Some(0), "{}", again.stdout);
    Ok(())
}

fn legacy_arguments(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    table.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    for (key, value) in pairs {
        table.insert((*key).into(), value.clone());
    }
    table
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.to_owned()))
}

#[tokio::test]
async fn topology_apply_migrates_an_empty_legacy_queue_and_never_deletes_one_holding_messages()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let operator = Management::as_operator(&env.settings.amqp)?;
    // As a deployment from before policies declared them: settings as x-
    // arguments and no policies; its parking lot holds an old dead letter.
    let mut work = vec![
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text("refunds.dead")),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
        ("x-delivery-limit", AMQPValue::LongLongInt(10)),
    ];
    let dead = vec![("x-max-length", AMQPValue::LongLongInt(100_000))];
    for (queue, arguments) in [
        ("refunds", std::mem::take(&mut work)),
        ("refunds.dead", dead),
    ] {
        operator
            .delete(&format!(
                "/policies/{}/courier.{queue}",
                courier::config::percent_encode(&env.settings.amqp.vhost)
            ))
            .await?;
        env.channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
        env.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                legacy_arguments(&arguments),
            )
            .await?;
    }
    env.channel
        .queue_bind(
            "refunds".into(),
            "orders.events".into(),
            "order.canceled".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    env.channel
        .queue_bind(
            "refunds.dead".into(),
            "refunds.failures".into(),
            "refunds.dead".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let old_letter = json_properties();
    let old_id = old_letter
        .message_id()
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    env.publish_raw("refunds.dead", b"{an old dead letter", old_letter)
        .await;

    let live = operator.live_topology(&env.settings.amqp.vhost).await?;
    let legacy: Vec<_> = drift::compare(&env.topology.plan(), &live)
        .into_iter()
        .filter_map(|d| match d {
            Drift::LegacyArgument {
                queue, argument, ..
            } => Some((queue, argument)),
            _ => None,
        })
        .collect();
    assert!(
        legacy.contains(&("refunds".to_owned(), "x-delivery-limit".to_owned()))
            && legacy.contains(&("refunds.dead".to_owned(), "x-max-length".to_owned())),
        "legacy arguments are drift: {legacy:?}"
    );

    let report = provision::declare_topology(&env.settings.amqp, &env.topology).await?;
    assert_eq!(report.migrated, vec!["refunds".to_owned()], "{report:?}");
    let left: Vec<_> = report
        .left
        .iter()
        .map(|l| (l.queue.as_str(), l.reason.as_str()))
        .collect();
    assert_eq!(left, vec![("refunds.dead", "it holds 1 message(s)")]);
    assert!(
        report.left[0]
            .to_string()
            .contains("never deletes a queue with messages")
    );
    assert_eq!(
        env.queue_depth("refunds.dead").await,
        1,
        "the old dead letter is still there"
    );
    assert!(
        env.broker
            .create_channel()
            .await?
            .queue_declare(
                "refunds.dead.migrating".into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .is_err(),
        "the holding queue is gone"
    );

    let check = courier(&env, &["topology", "check"], "").await?;
    assert_eq!(check.code, Some(1));
    assert!(
        check
            .stdout
            .contains("queue `refunds.dead`: legacy argument x-max-length = 100000")
            && !check.stdout.contains("queue `refunds`: legacy")
            && !check.stdout.contains("missing"),
        "{}",
        check.stdout
    );

    // Once the operator dealt with the old letter (purged, so kept in the
    // audit), the parking lot is migrated too and nothing drifts.
    let purged = courier(&env, &["dlq", "purge", "refunds", "--all", "--yes"], "").await?;
    assert_eq!(purged.code, Some(0), "{}", purged.stderr);
    assert_eq!(audit_rows(&env, &old_id).await?.len(), 1);
    let report = provision::declare_topology(&env.settings.amqp, &env.topology).await?;
    assert_eq!(report.migrated, vec!["refunds.dead".to_owned()]);
    assert!(report.left.is_empty());
    let check = courier(&env, &["topology", "check"], "").await?;
    assert_eq!(check.code, Some(0), "{}", check.stdout);

    // The migrated work queue dead-letters and retries by its policy now.
    let consumer = env.start_consumer().await;
    env.cancel_new_order("fail-1x-migrated").await;
    env.relay().relay_once().await?;
    wait_until("the refund is made after one retry", SETTLE, async || {
        env.count("SELECT count(*) FROM refunds").await == 1
    })
    .await;
    assert_eq!(consumer_stats(&consumer).await["refunds"].retried[0].1, 1);
    consumer.stop().await
}

#[tokio::test]
async fn a_dead_letter_moved_back_with_the_ui_shovel_gets_a_fresh_retry_budget_and_is_refunded_once()
-> anyhow::Result<()> {
    // `fail-5x-…`: four failures shelve it (first try + three tiers); moved
    // back, its fifth try fails too and must go to the first tier, not
    // straight back to the dead-letter queue; the sixth succeeds.
    let env = TestEnv::new().await;
    let consumer = env.start_consumer().await;
    let (order_id, event_id) = dead_lettered_refund(&env, "fail-5x-shovel", 0).await?;

    move_messages_like_the_ui(&env, "refunds.dead", "refunds").await?;
    wait_until("the moved message is refunded", SETTLE, async || {
        env.count(&format!(
            "SELECT count(*) FROM refunds WHERE order_id = '{order_id}'"
        ))
        .await
            == 1
    })
    .await;
    let stats = consumer_stats(&consumer).await;
    assert_eq!(
        stats["refunds"].retried[0].1, 2,
        "the first tier once before shelving and once after the move: {stats:?}"
    );
    assert_eq!(
        stats["refunds"].dead_lettered["exhausted"], 1,
        "shelved once only"
    );
    assert_eq!(env.queue_depth("refunds.dead").await, 0);

    // Moved back again after its refund happened (a duplicate dead letter):
    // the inbox absorbs it and no money moves.
    let (properties, body) = event_properties_of(&env, &event_id).await?;
    env.publish_raw("refunds.dead", body.as_bytes(), properties)
        .await;
    move_messages_like_the_ui(&env, "refunds.dead", "refunds").await?;
    wait_until("the moved duplicate is absorbed", SETTLE, async || {
        consumer_stats(&consumer).await["refunds"].duplicates == 1
    })
    .await;
    assert_eq!(
        env.gateway_ledger().await.len(),
        1,
        "one refund at the gateway"
    );
    assert_eq!(env.count("SELECT count(*) FROM refunds").await, 1);
    consumer.stop().await
}

/// What the management UI's "Move messages" button on a queue's page does
/// (rabbitmq_shovel_management 3.10): a dynamic shovel that moves the queue's
/// current length and deletes itself. Waits until the source is empty and
/// the shovel is gone.
async fn move_messages_like_the_ui(env: &TestEnv, from: &str, to: &str) -> anyhow::Result<()> {
    let operator = Management::as_operator(&env.settings.amqp)?;
    let vhost = &env.settings.amqp.vhost;
    let name = format!("Move from {from}");
    let path = format!(
        "/parameters/shovel/{}/{}",
        courier::config::percent_encode(vhost),
        courier::config::percent_encode(&name)
    );
    operator
        .put(
            &path,
            serde_json::json!({
                "component": "shovel",
                "vhost": vhost,
                "name": name,
                "value": {
                    "src-uri": format!("amqp:///{}", courier::config::percent_encode(vhost)),
                    "src-queue": from,
                    "src-protocol": "amqp091",
                    "src-prefetch-count": 1000,
                    "src-delete-after": "queue-length",
                    "dest-protocol": "amqp091",
                    "dest-uri": format!("amqp:///{}", courier::config::percent_encode(vhost)),
                    "dest-add-forward-headers": false,
                    "ack-mode": "on-confirm",
                    "src-consumer-args": {},
                    "dest-queue": to,
                }
            }),
        )
        .await?;
    let shovels = format!(
        "/parameters/shovel/{}",
        courier::config::percent_encode(vhost)
    );
    wait_until(
        "the shovel moved everything and deleted itself",
        SETTLE,
        async || {
            let remaining: Vec<Value> = operator.get(&shovels).await.unwrap_or_default();
            remaining.is_empty() && env.queue_depth(from).await == 0
        },
    )
    .await;
    Ok(())
}

/// Changes `queue`'s delivery limit through its policy, as an operator would
/// in the management UI.
async fn set_delivery_limit(
    operator: &Management,
    vhost: &str,
    plan: &courier::amqp::plan::TopologyPlan,
    queue: &str,
    limit: i64,
) -> anyhow::Result<()> {
    let mut policy = plan
        .policy_for(queue)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("{queue} has a policy"))?;
    policy
        .definition
        .insert("delivery-limit".into(), Value::from(limit));
    operator.put_policy(vhost, &policy).await?;
    Ok(())
}

#[tokio::test]
async fn a_policy_change_takes_effect_on_a_running_pipeline() -> anyhow::Result<()> {
    // Lower the delivery limit from 50 (config) to 2 through the queues'
    // policies while everything runs: a message that crashes the consumer is
    // then dead-lettered after two deliveries instead of fifty. Both queues
    // the event reaches get the new limit: the consumer dies at whichever of
    // its copies comes first, so with the notifications copy still at fifty
    // a loaded machine could spend any number of lives on it before the
    // refunds copy came back often enough. With both at two, every life
    // brings one of them closer to the dead-letter queue: at most six crashes.
    use crate::faults::harness::{CONSUMER, GATEWAY, PRODUCER, Run, assert_passed};
    let mut run = Run::new(|f| f.merge(Serialized::default("topology.delivery_limit", 50))).await;
    for name in [GATEWAY, PRODUCER] {
        run.spawn(name).await;
    }
    let operator = Management::as_operator(&run.settings.amqp)?;
    let plan = run.env.topology.plan();
    for queue in ["refunds", "notifications"] {
        set_delivery_limit(&operator, &run.settings.amqp.vhost, &plan, queue, 2).await?;
    }

    let orders = run.cancel_orders(1, "pay-policy-crasher").await;
    let event_id = {
        let mut conn = run.env.conn().await;
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        courier::store::schema::outbox::table
            .select(courier::store::schema::outbox::event_id)
            .first::<uuid::Uuid>(&mut conn)
            .await?
    };
    run.set_env(
        CONSUMER,
        &[("COURIER_CRASH_ON_MESSAGE", &event_id.to_string())],
    );
    run.spawn(CONSUMER).await;
    let report = run
        .settle(&orders.into_iter().collect(), Duration::from_secs(90))
        .await;
    assert_passed(&report, "policy change");
    assert_eq!(
        report.dead_lettered.get("delivery-limit"),
        Some(&1),
        "{report:?}"
    );
    assert!(
        (3..10).contains(&run.starts(CONSUMER)),
        "dead-lettered after a few crashes, not fifty: {:?}",
        run.pids
    );
    let live = operator.live_topology(&run.settings.amqp.vhost).await?;
    assert!(
        drift::compare(&run.env.topology.plan(), &live)
            .iter()
            .any(|d| d.to_string()
                == "policy drift `courier.refunds`: delivery-limit is 2, expected 50"),
        "the check names the change against the configuration"
    );
    Ok(())
}

#[test]
fn the_shipped_definitions_hold_exactly_the_policies_courier_topology_apply_sets()
-> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    let settings = courier::config::Settings::from_figment(
        courier::config::Settings::figment_with_secrets(&dir, "none", []),
    )?;
    let plan = courier::amqp::Topology::from_settings(&settings.topology).plan();
    let definitions: Value = serde_json::from_str(&std::fs::read_to_string(
        dir.join("rabbitmq-definitions.json"),
    )?)?;
    let shipped = definitions["policies"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // Refresh with `courier topology show --definitions` when the topology changes.
    assert_eq!(shipped.len(), plan.policies.len(), "{shipped:?}");
    for policy in &plan.policies {
        let found = shipped
            .iter()
            .find(|p| p["name"] == policy.name.as_str())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{} is not in the definitions (`courier topology show --definitions`)",
                    policy.name
                )
            })?;
        assert_eq!(found["vhost"], settings.amqp.vhost.as_str());
        assert_eq!(found["pattern"], policy.pattern.as_str());
        assert_eq!(found["apply-to"], policy.apply_to);
        assert_eq!(found["priority"], policy.priority);
        assert_eq!(
            found["definition"],
            serde_json::to_value(&policy.definition)?,
            "{}",
            policy.name
        );
    }
    let shown = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["topology", "show", "--definitions"])
        .env("COURIER_CONFIG_DIR", &dir)
        .env("COURIER_ENV", "none")
        .output()?;
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let shown: Value = serde_json::from_slice(&shown.stdout)?;
    assert_eq!(
        shown["policies"], definitions["policies"],
        "what `courier topology show --definitions` prints"
    );
    let operator = definitions["users"]
        .as_array()
        .and_then(|users| {
            users
                .iter()
                .find(|u| u["name"] == settings.amqp.operator.user.as_str())
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(operator["tags"], provision::OPERATOR_TAGS);
    Ok(())
}

#[tokio::test]
async fn outbox_status_shows_pending_events_their_age_and_last_errors() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let (_, failing) = env.cancel_new_order("pay-status-1").await;
    env.cancel_new_order("pay-status-2").await;
    {
        // What the relay records when the broker nacks a publish.
        let mut conn = env.conn().await;
        let row = courier::store::outbox::find_by_event_id(&mut conn, failing.as_uuid())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the event is in the outbox"))?;
        courier::store::outbox::record_failure(
            &mut conn,
            row.id,
            "broker nacked the message (a queue refused it, e.g. full with reject-publish)",
            chrono::Utc::now() + chrono::Duration::seconds(30),
        )
        .await?;
    }
    let status = courier(&env, &["outbox", "status", "--json"], "").await?;
    assert_eq!(status.code, Some(0), "{}", status.stderr);
    let status = status.json()?;
    assert_eq!(status["pending"], 2);
    assert_eq!(status["failing"], 1);
    assert_eq!(status["published"], 0);
    assert!(status["oldest_pending_at"].is_string(), "{status}");
    assert_eq!(
        status["last_errors"][0]["event_id"],
        failing.to_string().as_str()
    );
    assert!(
        status["last_errors"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("nacked")),
        "{status}"
    );
    let text = courier(&env, &["outbox", "status"], "").await?;
    assert!(
        text.stdout.contains("oldest pending age") && text.stdout.contains("broker nacked"),
        "{}",
        text.stdout
    );
    Ok(())
}

#[tokio::test]
async fn courier_check_counts_messages_in_delay_tiers_dead_letters_and_pending_events()
-> anyhow::Result<()> {
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default(
            "gateway_simulator.failing_payment_ids",
            ["pay-never-check"],
        ))
        // A tier long enough to find the retry waiting in it.
        .merge(Serialized::default("topology.retry_delays", ["1h"]))
    })
    .await;
    let consumer = env.start_consumer().await;
    dead_lettered_refund(&env, "pay-never-check", 0).await?;
    env.cancel_new_order("fail-1x-check").await;
    env.relay().relay_once().await?;
    wait_until("a refund waits in its delay tier", SETTLE, async || {
        env.queue_depth("refunds.retry.1h").await == 1
    })
    .await;
    env.cancel_new_order("pay-pending-check").await;

    let checked = courier(&env, &["check"], "").await?;
    let line = |label: &str| {
        checked
            .stdout
            .lines()
            .find(|l| l.starts_with(label))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    assert_eq!(
        line("refunds waiting in delay tiers").as_deref(),
        Some("refunds waiting in delay tiers 1 (refunds.retry.1h 1)"),
        "{}",
        checked.stdout
    );
    assert_eq!(
        line("refunds in refunds.dead").as_deref(),
        Some("refunds in refunds.dead 1")
    );
    assert_eq!(
        line("events pending (all types)").as_deref(),
        Some("events pending (all types) 1")
    );
    consumer.stop().await
}
