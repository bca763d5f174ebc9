//! Test support: each test gets its own RabbitMQ vhost and its own PostgreSQL
//! database on the machine's real services (created here, dropped when the
//! test ends, also when it fails), its own payment gateway simulator on a
//! free port, and handles to step the relay and start or stop a consumer.

use std::{path::PathBuf, time::Duration};

use courier::{
    amqp::{ConfirmedPublisher, Topology},
    config::Settings,
    consume::stats::WorkerSnapshot,
    domain::{EventId, Order, OrderId},
    gateway::simulator,
    outbox::Relay,
    store::{self, DbPool},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use figment::{Figment, providers::Serialized};
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{BasicGetOptions, QueueDeclareOptions},
    types::FieldTable,
};
use secrecy::ExposeSecret;
use tokio::{sync::oneshot, task::JoinHandle};
use uuid::Uuid;

pub const MANAGEMENT: &str = "http://127.0.0.1:15672";

/// The broker login every role of a test uses unless the test says otherwise.
pub fn guest() -> std::collections::BTreeMap<&'static str, &'static str> {
    [("user", "guest"), ("password", "guest")].into()
}

pub struct TestEnv {
    pub settings: Settings,
    pub db: DbPool,
    /// Kept open for `channel` and `publisher`.
    pub broker: Connection,
    pub channel: Channel,
    pub publisher: ConfirmedPublisher,
    pub topology: Topology,
    pub name: String,
    own_vhost: bool,
    gateway: Option<Service>,
}

/// A service running in this test process, stopped through its shutdown future.
pub struct Service {
    pub addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Service {
    /// Triggers shutdown and waits until the service returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => tokio::time::timeout(Duration::from_secs(30), task).await??,
            None => Ok(()),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn management() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_default()
}

impl TestEnv {
    pub async fn new() -> Self {
        Self::with(|figment| figment).await
    }

    /// A test environment whose settings the test may adjust first.
    pub async fn with(configure: impl FnOnce(Figment) -> Figment) -> Self {
        let name = format!(
            "courier_test_{}",
            &Uuid::now_v7().simple().to_string()[16..]
        );
        let base = Settings::figment(&config_dir(), "test")
            .merge(Serialized::default("database.name", &name))
            .merge(Serialized::default("amqp.vhost", &name))
            // Every role logs in as the test broker's administrator; the
            // least-privilege tests create and grant their own users.
            .merge(Serialized::default("amqp.producer", guest()))
            .merge(Serialized::default("amqp.consumer", guest()))
            .merge(Serialized::default("amqp.operator", guest()))
            .merge(Serialized::default(
                "topology.retry_delays",
                ["200ms", "400ms", "800ms"],
            ))
            .merge(Serialized::default("relay.poll_interval", "100ms"))
            .merge(Serialized::default("relay.backoff_base", "50ms"))
            .merge(Serialized::default("relay.backoff_max", "500ms"))
            .merge(Serialized::default("relay.confirm_timeout", "5s"))
            .merge(Serialized::default("consumer.stats_listen", "127.0.0.1:0"))
            // Many tests share one PostgreSQL (max_connections 100) at once.
            .merge(Serialized::default("database.pool_size", 4))
            .merge(Serialized::default("consumer.prefetch", 8))
            .merge(Serialized::default("consumer.concurrency", 4))
            .merge(Serialized::default("gateway_simulator.latency", "0ms"))
            .merge(Serialized::default(
                "gateway_simulator.transient_error_rate",
                0.0,
            ))
            .merge(Serialized::default("shutdown.deadline", "10s"))
            .merge(Serialized::default(
                "notifications.file_path",
                std::env::temp_dir().join(format!("{name}-notifications.jsonl")),
            ));
        let mut settings = match Settings::from_figment(configure(base)) {
            Ok(settings) => settings,
            Err(error) => panic!("test settings are invalid: {error}"),
        };

        create_database(&settings, &name).await;
        // A test on a throwaway broker uses its default vhost instead.
        let own_vhost = settings.amqp.vhost == name;
        if own_vhost {
            create_vhost(&settings, &name).await;
        }
        let migrated = store::run_migrations(&settings.database.url()).await;
        assert!(migrated.is_ok(), "migrations failed: {migrated:?}");

        let gateway_listener = bind().await;
        let gateway_addr = gateway_listener
            .local_addr()
            .unwrap_or_else(|e| panic!("{e}"));
        settings.gateway.url = format!("http://{gateway_addr}");
        let (stop, stopped) = oneshot::channel::<()>();
        let sim_settings = settings.gateway_simulator.clone();
        let http_settings = settings.http.clone();
        let task = tokio::spawn(async move {
            simulator::serve(
                gateway_listener,
                &sim_settings,
                &http_settings,
                async move {
                    let _ = stopped.await;
                },
            )
            .await
        });

        let db = store::pool(&settings.database).unwrap_or_else(|e| panic!("{e}"));
        let broker = Connection::connect(
            &settings.amqp.uri_as(&settings.amqp.operator),
            ConnectionProperties::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ: {e}"));
        let channel = broker
            .create_channel()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let publisher = ConfirmedPublisher::open(&broker)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let topology = Topology::from_settings(&settings.topology);
        // Exchanges, queues, bindings and each queue's policy, as the operator would.
        courier::amqp::provision::declare_topology(&settings.amqp, &topology)
            .await
            .unwrap_or_else(|e| panic!("cannot declare topology: {e:#}"));
        Self {
            settings,
            db,
            broker,
            channel,
            publisher,
            topology,
            name,
            own_vhost,
            gateway: Some(Service {
                addr: gateway_addr,
                stop: Some(stop),
                task: Some(task),
            }),
        }
    }

    pub async fn conn(&self) -> store::DbConn {
        self.db
            .get()
            .await
            .unwrap_or_else(|e| panic!("no database connection: {e}"))
    }

    pub fn relay(&self) -> Relay {
        let broker = courier::amqp::broker_pool(
            &self.settings.amqp,
            &self.settings.amqp.producer,
            "test-relay",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Relay::new(
            self.db.clone(),
            broker,
            self.topology.clone(),
            self.settings.relay.clone(),
            "courier-test",
        )
    }

    /// Places an order with this payment id, straight through the store.
    pub async fn place_order(&self, payment_id: &str) -> Order {
        let order = Order::place(
            courier::domain::PaymentId::parse(payment_id).unwrap_or_else(|e| panic!("{e}")),
            courier::domain::AmountCents::parse(1999).unwrap_or_else(|e| panic!("{e}")),
            courier::domain::CustomerEmail::parse("ada@example.org")
                .unwrap_or_else(|e| panic!("{e}")),
            None,
            chrono::Utc::now(),
        );
        let mut conn = self.conn().await;
        store::orders::insert(&mut conn, &order)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        order
    }

    /// Changes an order's shipping address straight through the store;
    /// returns the event raised (`None`: the address was already this one).
    pub async fn change_address(&self, order: OrderId, address: &str) -> Option<EventId> {
        let address =
            courier::domain::ShippingAddress::parse(address).unwrap_or_else(|e| panic!("{e}"));
        let mut conn = self.conn().await;
        store::orders::change_shipping_info(
            &mut conn,
            order,
            &address,
            Some("test"),
            chrono::Utc::now(),
        )
        .await
        .unwrap_or_else(|e| panic!("shipping change failed: {e}"))
        .1
    }

    /// A session of the test's own holding `order`'s row lock in an open
    /// transaction; [`release_row_lock`] lets the writers waiting on it go on.
    pub async fn lock_order_row(&self, order: &str) -> anyhow::Result<AsyncPgConnection> {
        self.lock_rows(&format!(
            "SELECT 1 FROM orders WHERE id = '{order}' FOR UPDATE"
        ))
        .await
    }

    /// A session of the test's own holding the locks that `locking_statement`
    /// takes (`SELECT … FOR UPDATE`, `LOCK TABLE …`), in an open transaction,
    /// until [`release_row_lock`].
    pub async fn lock_rows(&self, locking_statement: &str) -> anyhow::Result<AsyncPgConnection> {
        let mut holder = store::connect(&self.settings.database.url()).await?;
        diesel::sql_query("BEGIN").execute(&mut holder).await?;
        diesel::sql_query(locking_statement)
            .execute(&mut holder)
            .await?;
        Ok(holder)
    }

    /// Waits until `n` sessions of the test's database wait for a lock.
    pub async fn wait_for_lock_waiters(&self, n: i64, what: &str) {
        wait_until(what, Duration::from_secs(10), async || {
            self.count(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .await
                == n
        })
        .await;
    }

    /// The outbox rows of one event type, in id order.
    pub async fn outbox_rows(&self, event_type: &str) -> Vec<store::outbox::OutboxRow> {
        use courier::store::schema::outbox;
        use diesel::{ExpressionMethods, QueryDsl, SelectableHelper};
        let mut conn = self.conn().await;
        outbox::table
            .filter(outbox::event_type.eq(event_type))
            .order(outbox::id)
            .select(store::outbox::OutboxRow::as_select())
            .load(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Publishes a stored event straight into `queue`, as its relay would
    /// have sent it.
    pub async fn publish_row(&self, queue: &str, row: &store::outbox::OutboxRow) {
        self.publish_raw(
            queue,
            row.payload.to_string().as_bytes(),
            courier::amqp::envelope::properties_for(row, "test"),
        )
        .await;
    }

    /// Places and cancels an order; returns the order id and its event id.
    pub async fn cancel_new_order(&self, payment_id: &str) -> (OrderId, EventId) {
        let order = self.place_order(payment_id).await;
        let mut conn = self.conn().await;
        let (_, event_id) =
            store::orders::cancel(&mut conn, order.id, Some("test"), chrono::Utc::now())
                .await
                .unwrap_or_else(|e| panic!("cancel failed: {e}"));
        (order.id, event_id)
    }

    /// Starts the consumer (both workers) in this process.
    pub async fn start_consumer(&self) -> Service {
        spawn_service(
            self.settings.clone(),
            courier::app::consumer::run_until_stopped,
        )
        .await
    }

    /// Starts the order service (API + relay) in this process.
    pub async fn start_producer(&self) -> Service {
        spawn_service(
            self.settings.clone(),
            courier::app::producer::run_until_stopped,
        )
        .await
    }

    /// Publishes raw bytes straight into a queue, confirmed.
    pub async fn publish_raw(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        self.publisher
            .publish("", queue, body, properties, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("raw publish to {queue} failed: {e}"));
    }

    /// Takes one message from a queue, if there is one.
    pub async fn take(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        self.channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap_or_else(|e| panic!("basic_get {queue}: {e}"))
    }

    /// Waits for a message in `queue` and takes it.
    pub async fn take_within(
        &self,
        queue: &str,
        timeout: Duration,
    ) -> lapin::message::BasicGetMessage {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(message) = self.take(queue).await {
                return message;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no message arrived in {queue} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn queue_depth(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("passive declare {queue}: {e}"))
            .message_count()
    }

    pub async fn gateway_ledger(&self) -> Vec<courier::gateway::client::LedgerEntry> {
        courier::gateway::client::GatewayClient::new(&self.settings.gateway)
            .unwrap_or_else(|e| panic!("{e}"))
            .ledger()
            .await
            .unwrap_or_else(|e| panic!("ledger: {e}"))
    }

    pub async fn count(&self, sql: &str) -> i64 {
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = self.conn().await;
        let row: Count = diesel::sql_query(format!("SELECT ({sql})::bigint AS n"))
            .get_result(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        row.n
    }

    pub async fn execute(&self, sql: &str) {
        let mut conn = self.conn().await;
        diesel::sql_query(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(mut gateway) = self.gateway.take()
            && let Some(stop) = gateway.stop.take()
        {
            let _ = stop.send(());
        }
        let settings = self.settings.clone();
        let name = self.name.clone();
        let own_vhost = self.own_vhost;
        // Async cleanup from a destructor: a fresh runtime on its own thread,
        // so it also runs when the test panicked.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if own_vhost {
                    let _ = management()
                        .delete(format!("{MANAGEMENT}/api/vhosts/{name}"))
                        .basic_auth(
                            &settings.amqp.operator.user,
                            Some(settings.amqp.operator.password.expose_secret()),
                        )
                        .send()
                        .await;
                }
                if let Ok(mut conn) = store::connect(&settings.database.url_for("postgres")).await {
                    let _ = diesel::sql_query(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    ))
                    .execute(&mut conn)
                    .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

async fn create_database(settings: &Settings, name: &str) {
    let mut conn: AsyncPgConnection = store::connect(&settings.database.url_for("postgres"))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot reach PostgreSQL as `{}` (run scripts/setup.sh): {e}",
                settings.database.user
            )
        });
    diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
}

async fn create_vhost(settings: &Settings, name: &str) {
    let http = management();
    let auth = |request: reqwest::RequestBuilder| {
        request.basic_auth(
            &settings.amqp.operator.user,
            Some(settings.amqp.operator.password.expose_secret()),
        )
    };
    let created = auth(http.put(format!("{MANAGEMENT}/api/vhosts/{name}")))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status);
    assert!(
        created.is_ok(),
        "cannot create vhost {name} (is rabbitmq_management enabled? run scripts/setup.sh): {created:?}"
    );
    let permitted = auth(http.put(format!(
        "{MANAGEMENT}/api/permissions/{name}/{}",
        settings.amqp.operator.user
    )))
    .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
    .send()
    .await
    .and_then(reqwest::Response::error_for_status);
    assert!(
        permitted.is_ok(),
        "cannot grant permissions on {name}: {permitted:?}"
    );
}

/// Runs `run_until_stopped(settings, listener, shutdown)` on a free port.
pub async fn spawn_service<F, Fut>(settings: Settings, run_until_stopped: F) -> Service
where
    F: FnOnce(Settings, tokio::net::TcpListener, ShutdownSignal) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = bind().await;
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown: ShutdownSignal = Box::pin(async move {
        let _ = stopped.await;
    });
    let task = tokio::spawn(run_until_stopped(settings, listener, shutdown));
    Service {
        addr,
        stop: Some(stop),
        task: Some(task),
    }
}

type ShutdownSignal = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

pub async fn bind() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("cannot bind a free port: {e}"))
}

/// Ends the transaction of a [`TestEnv::lock_order_row`] session.
pub async fn release_row_lock(holder: &mut AsyncPgConnection) -> anyhow::Result<()> {
    diesel::sql_query("ROLLBACK").execute(holder).await?;
    Ok(())
}

/// Polls `check` until it returns true, failing the test after `timeout`.
pub async fn wait_until<F>(what: &str, timeout: Duration, mut check: F)
where
    F: AsyncFnMut() -> bool,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The consumer's counters, from its /stats endpoint.
pub async fn consumer_stats(
    consumer: &Service,
) -> std::collections::BTreeMap<String, WorkerSnapshot> {
    consumer_stats_at(consumer.addr).await
}

pub async fn consumer_stats_at(
    addr: std::net::SocketAddr,
) -> std::collections::BTreeMap<String, WorkerSnapshot> {
    reqwest::get(format!("http://{addr}/stats"))
        .await
        .and_then(reqwest::Response::error_for_status)
        .unwrap_or_else(|e| panic!("consumer /stats: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("consumer /stats body: {e}"))
}

/// A free address for a child process to listen on
/// ([`crate::support::free_port`]).
pub async fn free_port() -> String {
    format!("127.0.0.1:{}", crate::support::free_port())
}

/// Properties of a well-formed `order.canceled` message under a new message
/// id, whatever its body: for poison and forged messages.
pub fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(Uuid::now_v7().to_string().into())
        .with_type("order.canceled".into())
        .with_delivery_mode(2)
}

pub fn header_text(message: &lapin::message::BasicGetMessage, key: &str) -> Option<String> {
    courier::amqp::envelope::header_text(&message.delivery.properties, key)
}

pub fn header_int(message: &lapin::message::BasicGetMessage, key: &str) -> Option<i64> {
    courier::amqp::envelope::header_int(&message.delivery.properties, key)
}

/// An `order.canceled` event as the order service would raise it for
/// `order`, under a new event id, whatever the order's real state: what a
/// forger, or an operator republishing by hand, puts on the wire.
pub fn event_for(order: &Order) -> courier::domain::OrderCanceled {
    courier::domain::OrderCanceled {
        event_id: EventId::generate(),
        occurred_at: chrono::Utc::now(),
        order_id: order.id,
        payment_id: order.payment_id.clone(),
        amount_cents: order.amount,
        customer_email: order.customer_email.clone(),
        order_version: order.version + 1,
    }
}

/// Publishes `event` straight into `queue` with a complete, well-formed
/// envelope, confirmed.
pub async fn publish_event_into(
    publisher: &ConfirmedPublisher,
    queue: &str,
    event: &courier::domain::OrderCanceled,
) -> anyhow::Result<()> {
    publish_record_into(publisher, queue, &event.to_record()?).await
}

/// Publishes an event record straight into `queue` with a complete,
/// well-formed envelope, confirmed: what its relay would send, by hand.
pub async fn publish_record_into(
    publisher: &ConfirmedPublisher,
    queue: &str,
    record: &courier::domain::EventRecord,
) -> anyhow::Result<()> {
    let row = courier::store::outbox::OutboxRow {
        id: 0,
        event_id: record.event_id.as_uuid(),
        event_type: record.event_type.to_owned(),
        event_version: record.event_version,
        aggregate_type: record.aggregate_type.to_owned(),
        aggregate_id: record.aggregate_id.clone(),
        aggregate_version: record.aggregate_version,
        content_type: "application/json".to_owned(),
        payload: record.payload.clone(),
        correlation_id: Some("forged".to_owned()),
        occurred_at: record.occurred_at,
        published_at: None,
        attempts: 0,
        last_error: None,
        next_attempt_at: record.occurred_at,
    };
    publisher
        .publish(
            "",
            queue,
            row.payload.to_string().as_bytes(),
            courier::amqp::envelope::properties_for(&row, "forger"),
            Duration::from_secs(5),
        )
        .await?;
    Ok(())
}
