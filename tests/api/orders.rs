//! P1: an order change and its event commit together or not at all; the
//! order API's answers.

use courier::{
    domain::OrderState,
    store::{self, orders::ChangeOrderError},
};
use diesel_async::AsyncPgConnection;
use figment::providers::Serialized;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::helpers::{Service, TestEnv, release_row_lock};

#[tokio::test]
async fn an_order_and_its_event_commit_together() {
    let env = TestEnv::new().await;
    let (order_id, event_id) = env.cancel_new_order("pay-commit-1").await;

    let mut conn = env.conn().await;
    let order = store::orders::find(&mut conn, order_id)
        .await
        .ok()
        .flatten();
    let Some(order) = order else {
        panic!("order {order_id} is gone")
    };
    assert_eq!(order.state, OrderState::Canceled);
    assert_eq!(order.version, 2);
    let row = store::outbox::find_by_event_id(&mut conn, event_id.as_uuid())
        .await
        .ok()
        .flatten();
    let Some(row) = row else {
        panic!("no outbox row for {event_id}")
    };
    assert_eq!(row.event_type, "order.canceled");
    assert_eq!(row.aggregate_id, order_id.to_string());
    assert_eq!(row.aggregate_version, 2);
    assert!(row.published_at.is_none(), "nothing was published yet");
    assert_eq!(row.payload["payment_id"], "pay-commit-1");
    assert_eq!(row.payload["amount_cents"], 1999);
}

#[tokio::test]
async fn a_failed_cancel_writes_neither_the_order_change_nor_the_event() {
    let env = TestEnv::new().await;
    let order = env.place_order("pay-rollback-1").await;
    // Make the outbox half of the cancel's one statement fail, for real, in the database.
    env.execute(
        "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'outbox refused'; END; $$ LANGUAGE plpgsql",
    )
    .await;
    env.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION refuse()",
    )
    .await;

    let mut conn = env.conn().await;
    let result = store::orders::cancel(&mut conn, order.id, None, chrono::Utc::now()).await;
    assert!(
        matches!(&result, Err(ChangeOrderError::Store(e)) if e.to_string().contains("outbox refused")),
        "the cancel must fail on the outbox insert: {result:?}"
    );
    let stored = store::orders::find(&mut conn, order.id)
        .await
        .ok()
        .flatten();
    assert_eq!(
        stored.map(|o| (o.state, o.version)),
        Some((OrderState::Placed, 1))
    );
    assert_eq!(env.count("SELECT count(*) FROM outbox").await, 0);
}

async fn post(url: String, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut request = client.post(url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("{e}"));
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn create_order(base: &str, payment_id: &str) -> String {
    let (status, body) = post(
        format!("{base}/orders"),
        Some(json!({"payment_id": payment_id, "amount_cents": 1500, "customer_email": "bo@example.org"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["id"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no id in {body}"))
}

#[tokio::test]
async fn canceling_a_shipped_order_is_a_409_with_a_reason_and_writes_no_event() {
    let env = TestEnv::new().await;
    let producer = env.start_producer().await;
    let base = format!("http://{}", producer.addr);
    let id = create_order(&base, "pay-shipped-1").await;
    let (status, _) = post(format!("{base}/orders/{id}/ship"), None).await;
    assert_eq!(status, 200);

    let (status, body) = post(format!("{base}/orders/{id}/cancel"), None).await;
    assert_eq!(status, 409);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("shipped")),
        "{body}"
    );
    assert_eq!(env.count("SELECT count(*) FROM outbox").await, 0);
    producer.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn canceling_an_order_twice_is_a_409_and_writes_one_event() {
    let env = TestEnv::new().await;
    let producer = env.start_producer().await;
    let base = format!("http://{}", producer.addr);
    let id = create_order(&base, "pay-twice-1").await;
    let (first, body) = post(format!("{base}/orders/{id}/cancel"), None).await;
    assert_eq!(first, 200, "{body}");
    assert!(body["event_id"].is_string());
    let (second, body) = post(format!("{base}/orders/{id}/cancel"), None).await;
    assert_eq!(second, 409);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("already canceled")),
        "{body}"
    );
    assert_eq!(env.count("SELECT count(*) FROM outbox").await, 1);
    producer.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn canceling_an_unknown_order_is_a_404() {
    let env = TestEnv::new().await;
    let producer = env.start_producer().await;
    let base = format!("http://{}", producer.addr);
    let (status, body) = post(
        format!("{base}/orders/{}/cancel", uuid::Uuid::now_v7()),
        None,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = post(format!("{base}/orders/not-a-uuid/cancel"), None).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("not a UUID")),
        "{body}"
    );
    producer.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_bad_order_request_is_a_4xx_that_says_what_is_wrong() {
    let env = TestEnv::new().await;
    let producer = env.start_producer().await;
    let base = format!("http://{}", producer.addr);
    let (status, body) = post(
        format!("{base}/orders"),
        Some(json!({"payment_id": "pay-1", "amount_cents": 100, "customer_email": "nobody"})),
    )
    .await;
    assert_eq!(status, 422);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("customer_email")),
        "{body}"
    );
    let (status, body) = post(
        format!("{base}/orders"),
        Some(json!({"payment_id": "pay-1", "amount_cents": -3, "customer_email": "a@b.c"})),
    )
    .await;
    assert_eq!(status, 422);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("amount_cents")),
        "{body}"
    );
    let (status, body) = post(format!("{base}/orders"), Some(json!({"payment_id": 7}))).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("payment_id")),
        "{body}"
    );
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);
    producer.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

/// A fresh environment with its order API running, and the API's base URL.
async fn api() -> (TestEnv, Service, String) {
    let env = TestEnv::new().await;
    let producer = env.start_producer().await;
    let base = format!("http://{}", producer.addr);
    (env, producer, base)
}

/// The status and the `error` text of a 4xx answer, which must be JSON.
async fn refusal(request: reqwest::RequestBuilder) -> anyhow::Result<(u16, String)> {
    let response = request.send().await?;
    let status = response.status().as_u16();
    let body: Value = response.json().await?;
    let Some(error) = body["error"].as_str() else {
        anyhow::bail!("{status} without an `error` text: {body}");
    };
    Ok((status, error.to_owned()))
}

fn order_with(field: &str, value: Value) -> Value {
    let mut order = json!({
        "payment_id": "pay-hostile-1",
        "amount_cents": 1500,
        "customer_email": "bo@example.org",
        "shipping_address": "1 Main St",
    });
    order[field] = value;
    order
}

#[tokio::test]
async fn a_nul_character_in_customer_email_is_a_422_naming_the_field() -> anyhow::Result<()> {
    let (env, api, base) = api().await;
    let order = order_with("customer_email", json!("bo\u{0}@example.org"));
    let (status, error) = refusal(
        reqwest::Client::new()
            .post(format!("{base}/orders"))
            .json(&order),
    )
    .await?;
    assert_eq!(status, 422, "{error}");
    assert!(error.contains("customer_email"), "{error}");
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);
    api.stop().await
}

#[tokio::test]
async fn a_nul_character_in_shipping_address_is_a_422_naming_the_field() -> anyhow::Result<()> {
    let (env, api, base) = api().await;
    let order = order_with("shipping_address", json!("1 Main St\u{0}"));
    let (status, error) = refusal(
        reqwest::Client::new()
            .post(format!("{base}/orders"))
            .json(&order),
    )
    .await?;
    assert_eq!(status, 422, "{error}");
    assert!(error.contains("shipping_address"), "{error}");
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);
    api.stop().await
}

#[tokio::test]
async fn control_characters_in_any_text_field_are_a_422_naming_the_field() -> anyhow::Result<()> {
    let (env, api, base) = api().await;
    let client = reqwest::Client::new();
    for (field, valid) in [
        ("payment_id", "pay-1"),
        ("customer_email", "bo@example.org"),
        ("shipping_address", "1 Main St"),
    ] {
        // NUL, escape and delete, at the end where a careless check stops looking.
        for control in ['\u{0}', '\u{1b}', '\u{7f}'] {
            let order = order_with(field, json!(format!("{valid}{control}")));
            let (status, error) =
                refusal(client.post(format!("{base}/orders")).json(&order)).await?;
            assert_eq!(status, 422, "{field} {control:?}: {error}");
            assert!(error.contains(field), "{field} {control:?}: {error}");
        }
    }
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);
    api.stop().await
}

#[tokio::test]
async fn a_wrong_typed_field_is_a_422_naming_the_field() -> anyhow::Result<()> {
    let (env, api, base) = api().await;
    let client = reqwest::Client::new();
    for (field, value) in [
        ("payment_id", json!(7)),
        ("amount_cents", json!("1500")),
        ("amount_cents", json!(1.5)),
        ("customer_email", json!(["bo@example.org"])),
        ("shipping_address", json!({"street": "1 Main St"})),
    ] {
        let order = order_with(field, value.clone());
        let (status, error) = refusal(client.post(format!("{base}/orders")).json(&order)).await?;
        assert_eq!(status, 422, "{field} = {value}: {error}");
        assert!(error.contains(field), "{field} = {value}: {error}");
    }
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);
    api.stop().await
}

#[tokio::test]
async fn a_missing_field_is_a_422_naming_it() -> anyhow::Result<()> {
    let (env, api, base) = api().await;
    let client = reqwest::Client::new();
    for field in ["payment_id", "amount_cents", "customer_email"] {
        let mut order = order_with(field, Value::Null);
        if let Some(order) = order.as_object_mut() {
            order.remove(field);
        }
        let (status, error) = refusal(client.post(format!("{base}/orders")).json(&order)).await?;
        assert_eq!(status, 422, "without {field}: {error}");
        assert!(error.contains(field), "without {field}: {error}");
    }
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);
    api.stop().await
}

#[tokio::test]
async fn malformed_json_is_a_400() -> anyhow::Result<()> {
    let (env, api, base) = api().await;
    let client = reqwest::Client::new();
    for body in [
        &b"{\"payment_id\": \"pay-1\","[..],
        b"not json",
        b"",
        b"{\"payment_id\": \"\xff\"}",
    ] {
        let request = client
            .post(format!("{base}/orders"))
            .header("content-type", "application/json")
            .body(body.to_vec());
        let (status, error) = refusal(request).await?;
        assert_eq!(status, 400, "{:?}: {error}", String::from_utf8_lossy(body));
    }
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);
    api.stop().await
}

#[tokio::test]
async fn an_oversize_body_is_a_413() -> anyhow::Result<()> {
    let (env, api, base) = api().await;
    let huge = "x".repeat(10 * 1024 * 1024);
    let order = order_with("shipping_address", json!(huge));
    let (status, error) = refusal(
        reqwest::Client::new()
            .post(format!("{base}/orders"))
            .json(&order),
    )
    .await?;
    assert_eq!(status, 413, "{error}");
    assert!(
        error.contains(&courier::http::MAX_BODY_BYTES.to_string()),
        "{error}"
    );
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);
    api.stop().await
}

#[tokio::test]
async fn a_wrong_content_type_is_a_415() -> anyhow::Result<()> {
    let (env, api, base) = api().await;
    let client = reqwest::Client::new();
    let order = order_with("payment_id", json!("pay-form-1")).to_string();
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut request = client.post(format!("{base}/orders")).body(order.clone());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let (status, error) = refusal(request).await?;
        assert_eq!(status, 415, "{content_type:?}: {error}");
        assert!(
            error.contains("application/json"),
            "{content_type:?}: {error}"
        );
    }
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);
    api.stop().await
}

#[tokio::test]
async fn an_unknown_route_is_a_404_with_a_json_body() -> anyhow::Result<()> {
    let (_env, api, base) = api().await;
    let client = reqwest::Client::new();
    for path in ["/nope", "/orders/x/y/z", "/healthz/", "/%00"] {
        let (status, error) = refusal(client.get(format!("{base}{path}"))).await?;
        assert_eq!(status, 404, "{path}: {error}");
        assert!(error.contains("no such route"), "{path}: {error}");
    }
    api.stop().await
}

#[tokio::test]
async fn a_wrong_method_is_a_405_with_a_json_body() -> anyhow::Result<()> {
    let (_env, api, base) = api().await;
    let client = reqwest::Client::new();
    for (method, path, allowed) in [
        (reqwest::Method::GET, "/orders", "POST"),
        (
            reqwest::Method::DELETE,
            "/orders/0190f0f0-0000-7000-8000-000000000000",
            "GET",
        ),
        (
            reqwest::Method::GET,
            "/orders/0190f0f0-0000-7000-8000-000000000000/cancel",
            "POST",
        ),
        (reqwest::Method::POST, "/healthz", "GET"),
    ] {
        let response = client
            .request(method.clone(), format!("{base}{path}"))
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 405, "{method} {path}");
        let allow = response
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        assert!(
            allow.as_deref().is_some_and(|a| a.contains(allowed)),
            "{method} {path}: Allow {allow:?}"
        );
        let body: Value = response.json().await?;
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("not allowed")),
            "{method} {path}: {body}"
        );
    }
    api.stop().await
}

/// Ends every other session of the test's database, and says how many.
async fn terminate_sessions(env: &TestEnv, which: &str) -> i64 {
    env.count(&format!(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND {which}"
    ))
    .await
}

/// The order API's pool hands out connections without a ping; a session the
/// database ended since its last use costs the request one retry, not a 503.
#[tokio::test]
async fn a_cancel_right_after_its_pooled_session_was_terminated_succeeds() -> anyhow::Result<()> {
    let (env, api, base) = api().await;
    // Whether the client has seen the session end by the next checkout is a
    // race (about one in three goes to the stale session), so run it often
    // enough that the stale case surely comes up.
    for round in 1..=10 {
        // Leaves the API's pooled session idle, to be ended under it.
        let id = create_order(&base, &format!("pay-terminated-{round}")).await;
        let terminated = terminate_sessions(&env, "true").await;
        assert!(terminated > 0, "round {round}: no session was terminated");
        let (status, body) = post(format!("{base}/orders/{id}/cancel"), None).await;
        assert_eq!(status, 200, "round {round}: {body}");
    }
    assert_eq!(env.count("SELECT count(*) FROM outbox").await, 10);
    api.stop().await
}

/// POSTs `/orders/{id}/{action}` once per action, all at once, while a
/// session of the test's own holds the order's row lock; returns when every
/// request waits for it, so all of them have read the order and none has
/// written it. `ROLLBACK` on the returned session lets them go on.
async fn post_while_order_is_locked(
    env: &TestEnv,
    base: &str,
    id: &str,
    actions: &[&str],
) -> anyhow::Result<(AsyncPgConnection, Vec<JoinHandle<(u16, Value)>>)> {
    let holder = env.lock_order_row(id).await?;
    let requests = actions
        .iter()
        .map(|action| tokio::spawn(post(format!("{base}/orders/{id}/{action}"), None)))
        .collect();
    let waiting = i64::try_from(actions.len())?;
    env.wait_for_lock_waiters(
        waiting,
        &format!("{waiting} requests wait for the order's row lock"),
    )
    .await;
    Ok((holder, requests))
}

/// The same without the race: the cancel's session is ended while it waits
/// for a row lock the test holds, so its statement surely fails.
#[tokio::test]
async fn a_cancel_whose_session_is_terminated_mid_statement_succeeds() -> anyhow::Result<()> {
    let (env, api, base) = api().await;
    let id = create_order(&base, "pay-terminated-mid").await;
    let (mut holder, requests) = post_while_order_is_locked(&env, &base, &id, &["cancel"]).await?;
    let terminated = terminate_sessions(&env, "wait_event_type = 'Lock'").await;
    assert_eq!(terminated, 1, "the cancel's session was terminated");
    release_row_lock(&mut holder).await?;

    for request in requests {
        let (status, body) = request.await?;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(env.count("SELECT count(*) FROM outbox").await, 1);
    api.stop().await
}

/// All of them read the order before any writes it (the test holds the row
/// until they wait on it), so each would raise an event if only its read
/// decided; the version check makes every loser decide again and be refused.
#[tokio::test]
async fn concurrent_cancels_of_one_order_raise_one_event() -> anyhow::Result<()> {
    // Each cancel in a batch of its own, all written at once: the race the
    // version check settles (cancels in one batch never race each other).
    let env = TestEnv::with(|f| {
        f.merge(Serialized::default("database.pool_size", 8))
            .merge(Serialized::default("producer.cancel_batch_max", 1))
            .merge(Serialized::default("producer.cancel_batches_in_flight", 5))
    })
    .await;
    let api = env.start_producer().await;
    let base = format!("http://{}", api.addr);
    let id = create_order(&base, "pay-concurrent-1").await;
    let (mut holder, cancels) =
        post_while_order_is_locked(&env, &base, &id, &["cancel"; 5]).await?;
    release_row_lock(&mut holder).await?;

    let mut statuses = Vec::new();
    for cancel in cancels {
        let (status, body) = cancel.await?;
        assert!(status == 200 || status == 409, "{status}: {body}");
        statuses.push(status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409, 409, 409, 409]);
    assert_eq!(env.count("SELECT count(*) FROM outbox").await, 1);
    assert_eq!(
        env.count("SELECT version FROM orders").await,
        2,
        "the order changed once"
    );
    api.stop().await
}

/// A cancel and a ship that both read the order as placed: whichever writes
/// second is refused, so a shipped order never has an `order.canceled`.
#[tokio::test]
async fn a_cancel_racing_a_ship_raises_no_event_for_a_shipped_order() -> anyhow::Result<()> {
    let (env, api, base) = api().await;
    let id = create_order(&base, "pay-race-ship-1").await;
    let (mut holder, mut requests) =
        post_while_order_is_locked(&env, &base, &id, &["cancel", "ship"]).await?;
    release_row_lock(&mut holder).await?;

    let (Some(ship), Some(cancel)) = (requests.pop(), requests.pop()) else {
        anyhow::bail!("one request per action");
    };
    let ((canceled, cancel_body), (shipped, ship_body)) = (cancel.await?, ship.await?);
    let state = env
        .count("SELECT CASE state WHEN 'shipped' THEN 1 WHEN 'canceled' THEN 2 END FROM orders")
        .await;
    let events = env.count("SELECT count(*) FROM outbox").await;
    match (canceled, shipped) {
        (200, 409) => assert_eq!((state, events), (2, 1), "{ship_body}"),
        (409, 200) => assert_eq!((state, events), (1, 0), "{cancel_body}"),
        other => panic!("exactly one must win: {other:?} {cancel_body} {ship_body}"),
    }
    api.stop().await
}
