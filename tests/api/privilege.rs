//! Least privilege, in use and proven: each service's broker user can do
//! what its service needs and nothing else, and a refusal stops the service
//! with a configuration error instead of being retried as an outage. Every
//! refusal is observed on a real connection as that user.

use std::time::Duration;

use courier::{
    amqp::{ConfirmedPublisher, management::Management, permissions::Permissions, provision},
    config::{AmqpSettings, BrokerUser, ConfigError, Settings},
};
use figment::providers::Serialized;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions, QueuePurgeOptions},
};
use secrecy::SecretString;

use crate::helpers::{MANAGEMENT, TestEnv, bind, consumer_stats, wait_until};

const SETTLE: Duration = Duration::from_secs(20);

/// This test's own producer, consumer and operator users, granted on its
/// vhost exactly as `courier broker apply` grants them. Users are global to
/// the broker, so they carry the test's name and are deleted at the end.
struct TestUsers {
    admin: Management,
    amqp: AmqpSettings,
}

impl TestUsers {
    async fn provision(env: &TestEnv) -> anyhow::Result<Self> {
        let login = |role: &str| BrokerUser {
            user: format!("{}-{role}", env.name),
            password: SecretString::from(format!("{role}-pässwörd #1 \"quoted\"")),
        };
        let mut amqp = env.settings.amqp.clone();
        amqp.producer = login("producer");
        amqp.consumer = login("consumer");
        amqp.operator = login("operator");
        let admin = Management::new(MANAGEMENT, "guest", SecretString::from("guest"))?;
        provision::provision(&admin, &amqp, &env.topology).await?;
        Ok(Self { admin, amqp })
    }

    async fn connect(&self, who: &BrokerUser) -> anyhow::Result<Connection> {
        Ok(Connection::connect(&self.amqp.uri_as(who), ConnectionProperties::default()).await?)
    }

    /// `env`'s settings, with every service logging in as its own user.
    fn settings(&self, env: &TestEnv) -> Settings {
        let mut settings = env.settings.clone();
        settings.amqp = self.amqp.clone();
        settings
    }

    async fn remove(self) -> anyhow::Result<()> {
        for who in [
            &self.amqp.producer,
            &self.amqp.consumer,
            &self.amqp.operator,
        ] {
            self.admin.delete_user(&who.user).await?;
        }
        Ok(())
    }
}

fn event_properties() -> BasicProperties {
    BasicProperties::default()
        .with_message_id(uuid::Uuid::now_v7().to_string().into())
        .with_type("order.canceled".into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

/// A confirmed publish as `connection`'s user, on a channel of its own (a
/// refusal closes the channel). Returns the error text, if any.
async fn publish_as(connection: &Connection, exchange: &str, key: &str) -> Option<String> {
    let publisher = match ConfirmedPublisher::open(connection).await {
        Ok(publisher) => publisher,
        Err(error) => return Some(error.to_string()),
    };
    publisher
        .publish(
            exchange,
            key,
            b"{}",
            event_properties(),
            Duration::from_secs(5),
        )
        .await
        .err()
        .map(|e| e.to_string())
}

/// Runs one channel operation as `connection`'s user and returns its error text.
async fn refusal_of<F, Fut, T>(connection: &Connection, operation: F) -> Option<String>
where
    F: FnOnce(lapin::Channel) -> Fut,
    Fut: Future<Output = Result<T, lapin::Error>>,
{
    let channel = match connection.create_channel().await {
        Ok(channel) => channel,
        Err(error) => return Some(error.to_string()),
    };
    operation(channel).await.err().map(|e| e.to_string())
}

fn assert_refused(error: Option<String>, object: &str, user: &str) {
    let error = error.unwrap_or_else(|| panic!("{user} was allowed to touch {object}"));
    assert!(
        error.contains("ACCESS_REFUSED") && error.contains(object) && error.contains(user),
        "expected 403 ACCESS_REFUSED on {object} for {user}, got: {error}"
    );
}

#[tokio::test]
async fn the_producer_user_can_publish_order_events_and_its_own_failure_copies_and_nothing_else()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let users = TestUsers::provision(&env).await?;
    let user = users.amqp.producer.user.clone();
    let producer = users.connect(&users.amqp.producer).await?;

    assert_eq!(
        publish_as(&producer, "orders.events", "order.canceled").await,
        None,
        "the relay's job"
    );
    assert_eq!(
        publish_as(
            &producer,
            "orders.refund-status.failures",
            "orders.refund-status.dead"
        )
        .await,
        None,
        "its refund-status worker's dead letters"
    );
    assert_refused(
        publish_as(&producer, "refunds.events", "refund.completed").await,
        "exchange 'refunds.events'",
        &user,
    );
    assert_refused(
        publish_as(&producer, "", "refunds").await,
        "exchange 'amq.default'",
        &user,
    );
    assert_refused(
        publish_as(&producer, "refunds.failures", "refunds.dead").await,
        "exchange 'refunds.failures'",
        &user,
    );
    assert_refused(
        refusal_of(&producer, async |ch| {
            ch.basic_get("refunds".into(), BasicGetOptions::default())
                .await
        })
        .await,
        "queue 'refunds'",
        &user,
    );
    assert_refused(
        refusal_of(&producer, async |ch| {
            ch.queue_purge("refunds".into(), QueuePurgeOptions::default())
                .await
        })
        .await,
        "queue 'refunds'",
        &user,
    );
    assert_refused(
        refusal_of(&producer, async |ch| {
            ch.queue_delete("refunds".into(), QueueDeleteOptions::default())
                .await
        })
        .await,
        "queue 'refunds'",
        &user,
    );
    let _ = producer.close(200, "done".into()).await;
    users.remove().await
}

#[tokio::test]
async fn the_consumer_user_cannot_publish_into_orders_events() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let users = TestUsers::provision(&env).await?;
    let user = users.amqp.consumer.user.clone();
    let consumer = users.connect(&users.amqp.consumer).await?;

    assert_refused(
        publish_as(&consumer, "orders.events", "order.canceled").await,
        "exchange 'orders.events'",
        &user,
    );
    assert_refused(
        publish_as(&consumer, "", "refunds").await,
        "exchange 'amq.default'",
        &user,
    );
    assert_refused(
        refusal_of(&consumer, async |ch| {
            ch.exchange_delete("orders.events".into(), ExchangeDeleteOptions::default())
                .await
        })
        .await,
        "exchange 'orders.events'",
        &user,
    );
    for queue in ["refunds.dead", "notifications.dead"] {
        assert_refused(
            refusal_of(&consumer, async |ch| {
                ch.queue_purge(queue.into(), QueuePurgeOptions::default())
                    .await
            })
            .await,
            &format!("queue '{queue}'"),
            &user,
        );
    }
    assert_refused(
        refusal_of(&consumer, async |ch| {
            ch.queue_delete("refunds".into(), QueueDeleteOptions::default())
                .await
        })
        .await,
        "queue 'refunds'",
        &user,
    );
    let _ = consumer.close(200, "done".into()).await;
    users.remove().await
}

#[tokio::test]
async fn only_the_consumer_user_can_publish_refund_events() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let users = TestUsers::provision(&env).await?;
    let consumer = users.connect(&users.amqp.consumer).await?;
    assert_eq!(
        publish_as(&consumer, "refunds.events", "refund.completed").await,
        None,
        "the refund side's relay"
    );
    assert_eq!(env.queue_depth("orders.refund-status").await, 1);
    let producer = users.connect(&users.amqp.producer).await?;
    assert_refused(
        publish_as(&producer, "refunds.events", "refund.failed").await,
        "exchange 'refunds.events'",
        &users.amqp.producer.user,
    );
    assert_refused(
        refusal_of(&consumer, async |ch| {
            ch.basic_get("orders.refund-status".into(), BasicGetOptions::default())
                .await
        })
        .await,
        "queue 'orders.refund-status'",
        &users.amqp.consumer.user,
    );
    let _ = consumer.close(200, "done".into()).await;
    let _ = producer.close(200, "done".into()).await;
    users.remove().await
}

#[tokio::test]
async fn the_consumer_user_can_write_failure_copies_only_into_its_own_tiers_and_dead_letters()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let users = TestUsers::provision(&env).await?;
    let consumer = users.connect(&users.amqp.consumer).await?;

    assert_eq!(
        publish_as(&consumer, "refunds.failures", "refunds.dead").await,
        None
    );
    assert_eq!(
        publish_as(&consumer, "refunds.failures", "refunds.retry.200ms").await,
        None
    );
    assert_eq!(env.queue_depth("refunds.dead").await, 1);
    wait_until("the tier's copy is back in refunds", SETTLE, async || {
        env.queue_depth("refunds").await == 1
    })
    .await;
    // Its failures exchange has no route into a work queue: the broker
    // returns such a copy instead of delivering it.
    let into_work = publish_as(&consumer, "refunds.failures", "refunds").await;
    assert!(
        into_work.as_deref().is_some_and(|e| e.contains("returned")),
        "{into_work:?}"
    );
    assert_eq!(
        env.queue_depth("refunds").await,
        1,
        "only the tier's copy came back"
    );
    let _ = consumer.close(200, "done".into()).await;
    users.remove().await
}

#[tokio::test]
async fn a_refund_and_a_dead_letter_flow_end_to_end_under_least_privilege_users()
-> anyhow::Result<()> {
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default(
            "gateway_simulator.failing_payment_ids",
            ["pay-doomed"],
        ))
    })
    .await;
    let users = TestUsers::provision(&env).await?;
    let settings = users.settings(&env);
    let consumer =
        crate::helpers::spawn_service(settings.clone(), courier::app::consumer::run_until_stopped)
            .await;
    let producer =
        crate::helpers::spawn_service(settings.clone(), courier::app::producer::run_until_stopped)
            .await;
    // Refunded after one retry through the consumer's failures exchange.
    env.cancel_new_order("fail-1x-privileged").await;
    // Refused by the gateway: a dead letter, also through that exchange.
    let doomed = env.place_order("pay-doomed").await;
    let mut conn = env.conn().await;
    courier::store::orders::cancel(&mut conn, doomed.id, None, chrono::Utc::now()).await?;
    drop(conn);
    wait_until(
        "one refund made and one order shelved",
        SETTLE,
        async || {
            consumer_stats(&consumer)
                .await
                .get("refunds")
                .is_some_and(|s| s.handled == 1 && s.dead_total() == 1)
        },
    )
    .await;
    let stats = consumer_stats(&consumer).await;
    assert_eq!(
        stats["refunds"].retried.iter().map(|(_, n)| n).sum::<u64>(),
        1
    );
    assert_eq!(env.count("SELECT count(*) FROM refunds").await, 1);
    assert_eq!(env.queue_depth("refunds.dead").await, 1);
    // Both outcomes went back to the orders: relayed as the consumer's user,
    // recorded by the order service's worker as the producer's.
    wait_until("both orders show their refund status", SETTLE, async || {
        env.count(
            "SELECT count(*) FROM orders WHERE refund_status = 'refunded' \
             OR (id = ANY(SELECT id FROM orders WHERE payment_id = 'pay-doomed') \
                 AND refund_status = 'refund_failed')",
        )
        .await
            == 2
    })
    .await;
    producer.stop().await?;
    consumer.stop().await?;
    users.remove().await
}

/// Takes `grant` away from `user` on the test's vhost.
async fn regrant(users: &TestUsers, user: &str, grant: &Permissions) -> anyhow::Result<()> {
    users
        .admin
        .set_permissions(&users.amqp.vhost, user, grant)
        .await
}

/// Runs `service` until it stops by itself, which it must within `SETTLE`.
async fn stopped_by_itself<F, Fut>(settings: Settings, service: F) -> anyhow::Error
where
    F: FnOnce(Settings, tokio::net::TcpListener, std::future::Pending<()>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let listener = bind().await;
    match tokio::time::timeout(SETTLE, service(settings, listener, std::future::pending())).await {
        Err(_) => panic!("the service kept retrying a refusal for {SETTLE:?}"),
        Ok(Ok(())) => panic!("the service stopped without an error"),
        Ok(Err(error)) => error,
    }
}

fn assert_configuration_error(error: &anyhow::Error, user: &str, object: &str) {
    let text = format!("{error:#}");
    assert!(
        matches!(
            error.downcast_ref::<ConfigError>(),
            Some(ConfigError::BrokerAccess { .. })
        ),
        "not a configuration error: {text}"
    );
    assert!(
        text.contains(user) && text.contains(object),
        "`{text}` should name {user} and {object}"
    );
}

#[tokio::test]
async fn a_consumer_refused_its_queue_stops_with_a_configuration_error_naming_user_and_queue()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let users = TestUsers::provision(&env).await?;
    let user = users.amqp.consumer.user.clone();
    let mut narrowed = Permissions::consumer(&env.topology);
    // Every work queue of the consumer but `refunds`, so that one is refused.
    narrowed.read = "^(notifications|shipping-sync)$".to_owned();
    regrant(&users, &user, &narrowed).await?;

    let error = stopped_by_itself(
        users.settings(&env),
        courier::app::consumer::run_until_stopped,
    )
    .await;
    assert_configuration_error(&error, &user, "queue 'refunds'");
    users.remove().await
}

#[tokio::test]
async fn a_relay_refused_its_exchange_stops_the_producer_with_a_configuration_error()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let users = TestUsers::provision(&env).await?;
    let user = users.amqp.producer.user.clone();
    regrant(
        &users,
        &user,
        &Permissions {
            write: "^$".to_owned(),
            ..Permissions::producer(&env.topology)
        },
    )
    .await?;
    env.cancel_new_order("pay-refused-relay").await;

    let error = stopped_by_itself(
        users.settings(&env),
        courier::app::producer::run_until_stopped,
    )
    .await;
    assert_configuration_error(&error, &user, "exchange 'orders.events'");
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .await,
        1,
        "the event waits in the outbox"
    );
    users.remove().await
}

#[tokio::test]
async fn a_wrong_broker_password_stops_the_consumer_with_a_configuration_error()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let users = TestUsers::provision(&env).await?;
    let mut settings = users.settings(&env);
    settings.amqp.consumer.password = SecretString::from("not-the-password");
    let user = settings.amqp.consumer.user.clone();
    let error = stopped_by_itself(settings, courier::app::consumer::run_until_stopped).await;
    assert_configuration_error(&error, &user, "Login was refused");
    assert!(!format!("{error:#}").contains("not-the-password"));
    users.remove().await
}

#[test]
fn the_services_log_in_as_their_own_users_by_default() -> anyhow::Result<()> {
    let settings = Settings::from_figment(Settings::figment_with_secrets(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config"),
        "none",
        [],
    ))?;
    assert_eq!(settings.amqp.producer.user, "courier-producer");
    assert_eq!(settings.amqp.consumer.user, "courier-consumer");
    assert_eq!(settings.amqp.operator.user, "courier-operator");
    Ok(())
}

#[test]
fn the_shipped_definitions_grant_exactly_what_courier_broker_apply_grants() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    let settings = Settings::from_figment(Settings::figment_with_secrets(&dir, "none", []))?;
    let topology = courier::amqp::Topology::from_settings(&settings.topology);
    let definitions: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.join("rabbitmq-definitions.json"),
    )?)?;
    let users = definitions["users"].as_array().cloned().unwrap_or_default();
    assert!(
        users
            .iter()
            .all(|u| u["name"] != "guest" && u["tags"] != "administrator"),
        "no guest, no administrator: {users:?}"
    );
    let expected = [
        (
            &settings.amqp.producer.user,
            Permissions::producer(&topology),
        ),
        (
            &settings.amqp.consumer.user,
            Permissions::consumer(&topology),
        ),
        (&settings.amqp.operator.user, Permissions::operator()),
    ];
    let granted = definitions["permissions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(granted.len(), expected.len());
    for (user, grant) in expected {
        let shipped = granted
            .iter()
            .find(|p| p["user"] == user.as_str())
            .ok_or_else(|| anyhow::anyhow!("{user} has no grant in the definitions"))?;
        assert_eq!(shipped["vhost"], settings.amqp.vhost.as_str());
        assert_eq!(shipped["configure"], grant.configure.as_str(), "{user}");
        assert_eq!(shipped["write"], grant.write.as_str(), "{user}");
        assert_eq!(shipped["read"], grant.read.as_str(), "{user}");
    }
    Ok(())
}
