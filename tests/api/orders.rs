//! P1: an order change and its event commit together or not at all; the
//! order API's answers.

use courier::{
    domain::OrderState,
    store::{self, orders::ChangeOrderError},
};
use serde_json::{Value, json};

use crate::helpers::TestEnv;

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
    // Make the second statement of the transaction fail, for real, in the database.
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
    assert!(status == 400 || status == 422, "{status} {body}");
    assert!(body["error"].is_string(), "{body}");
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);
    producer.stop().await.unwrap_or_else(|e| panic!("{e}"));
}
