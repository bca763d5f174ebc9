//! The event store: `GET /api/events` serves the order service's events in
//! commit order, never letting a reader that keeps its own offset skip one;
//! `courier outbox prune` removes old published events as a prefix, and a
//! reader behind it is told (410) instead of skipped; the pull consumer keeps
//! its own offset and resumes after a restart.

use std::{
    path::Path,
    process::{Command as StdCommand, Stdio},
    time::Duration,
};

use courier::{
    event_reader::{EventReader, ReadError, Step},
    http::EventsPage,
    store,
};
use nix::{sys::signal::Signal, unistd::Pid};
use secrecy::ExposeSecret;
use serde_json::Value;
use tokio::process::Command;

use crate::helpers::{Service, TestEnv, wait_until};

const SETTLE: Duration = Duration::from_secs(30);

/// Runs `sql` on a session of the test's own.
async fn run(conn: &mut diesel_async::AsyncPgConnection, sql: &str) -> anyhow::Result<()> {
    diesel_async::RunQueryDsl::execute(diesel::sql_query(sql), conn).await?;
    Ok(())
}

async fn get(url: &str) -> anyhow::Result<(u16, Value)> {
    let response = reqwest::get(url).await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

/// A page of `/api/events`, which must be a 200.
async fn page(api: &Service, query: &str) -> anyhow::Result<EventsPage> {
    let response = reqwest::get(format!("http://{}/api/events?{query}", api.addr)).await?;
    anyhow::ensure!(response.status() == 200, "{query}: {}", response.status());
    Ok(response.json().await?)
}

/// Everything the API serves after `after`, page by page, once it serves at
/// least `expected` events (other tests' open transactions on the same
/// server may hold the stream back for a moment).
async fn read_all(api: &Service, after: &str, expected: usize) -> Vec<Value> {
    let mut events = Vec::new();
    wait_until(
        &format!("{expected} events are served"),
        SETTLE,
        async || {
            events.clear();
            let mut after = after.to_owned();
            loop {
                let url = format!("http://{}/api/events?after={after}&limit=7", api.addr);
                let (status, body) = get(&url).await.unwrap_or((0, Value::Null));
                assert_eq!(status, 200, "{url}: {body}");
                let served = body["events"].as_array().cloned().unwrap_or_default();
                if served.is_empty() {
                    break;
                }
                after = body["next_after"].as_str().unwrap_or_default().to_owned();
                events.extend(served);
            }
            events.len() >= expected
        },
    )
    .await;
    events
}

#[tokio::test]
async fn the_event_api_serves_the_order_events_in_commit_order_with_their_offsets()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let api = env.start_producer().await;
    let mut expected = Vec::new();
    for i in 0..3 {
        expected.push(env.cancel_new_order(&format!("pay-api-{i}")).await.1);
    }
    let order = env.place_order("pay-api-ship").await;
    expected.extend(env.change_address(order.id, "1 Main St").await);
    // The refund side's events are its own, not the order service's stream.
    env.execute(
        "INSERT INTO outbox (event_id, publisher, event_type, event_version, aggregate_type, \
         aggregate_id, aggregate_version, payload, occurred_at) \
         VALUES (gen_random_uuid(), 'refunds', 'refund.failed', 1, 'refund', 'x', 1, '{}', now())",
    )
    .await;

    let events = read_all(&api, "0.0", 4).await;
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap_or_default())
        .collect();
    let expected: Vec<String> = expected.iter().map(ToString::to_string).collect();
    assert_eq!(ids, expected, "the order service's events, in commit order");
    let last = &events[3];
    assert_eq!(last["type"], "order.shipping-info-changed");
    assert_eq!(last["version"], 1);
    assert_eq!(last["aggregate"]["type"], "order");
    assert_eq!(last["aggregate"]["id"], order.id.to_string());
    assert_eq!(last["aggregate"]["version"], 2);
    assert_eq!(last["content_type"], "application/json");
    assert_eq!(last["payload"]["shipping_address"], "1 Main St");
    assert!(last["occurred_at"].is_string() && last["offset"].is_string());

    let first = page(&api, "limit=2").await?;
    assert_eq!(first.events.len(), 2);
    assert_eq!(first.next_after, first.events[1].offset);
    let second = page(&api, &format!("after={}&limit=2", first.next_after)).await?;
    assert_eq!(second.events[0].event_id.to_string(), expected[2]);
    let caught_up = page(
        &api,
        &format!("after={}", last["offset"].as_str().unwrap_or_default()),
    )
    .await?;
    assert!(caught_up.events.is_empty());
    assert_eq!(
        caught_up.next_after,
        last["offset"].as_str().unwrap_or_default()
    );
    api.stop().await
}

#[tokio::test]
async fn a_reader_never_skips_an_event_whose_transaction_commits_after_a_later_one()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let api = env.start_producer().await;
    // An event whose transaction takes its id now and commits late.
    let mut slow = store::connect(&env.settings.database.url()).await?;
    run(&mut slow, "BEGIN").await?;
    run(
        &mut slow,
        "INSERT INTO outbox (event_id, event_type, event_version, aggregate_type, aggregate_id, \
         aggregate_version, payload, occurred_at) \
         VALUES (gen_random_uuid(), 'order.canceled', 1, 'order', 'slow', 2, '{}', now())",
    )
    .await?;
    // A later event, committed at once.
    let (_, quick) = env.cancel_new_order("pay-api-quick").await;

    // While the slow transaction is open, the committed event is held back:
    // serving it would move a reader's offset past the slow one's.
    let held = page(&api, "after=0.0").await?;
    assert!(held.events.is_empty(), "{:?}", held.events);
    run(&mut slow, "COMMIT").await?;
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM outbox s, outbox q \
             WHERE s.aggregate_id = 'slow' AND q.event_id = '{quick}' AND s.id < q.id"
        ))
        .await,
        1,
        "the late commit has the smaller id: a reader going by id would have passed it"
    );

    let events = read_all(&api, &held.next_after, 2).await;
    let aggregates: Vec<&str> = events
        .iter()
        .map(|e| e["aggregate"]["id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(aggregates.len(), 2, "each event once: {aggregates:?}");
    assert_eq!(
        aggregates[0], "slow",
        "the earlier transaction's event first"
    );
    api.stop().await
}

#[tokio::test]
async fn bad_event_api_parameters_are_a_400_with_a_message() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let api = env.start_producer().await;
    for (query, says) in [
        ("after=12", "not of the form"),
        ("after=abc.def", "not of the form"),
        ("after=-1.2", "not of the form"),
        ("limit=0", "not a positive number"),
        ("limit=-5", "not a positive number"),
        ("limit=lots", "limit"),
        ("offset=3", "offset"),
    ] {
        let (status, body) = get(&format!("http://{}/api/events?{query}", api.addr)).await?;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains(says)),
            "{query}: {body}"
        );
    }
    api.stop().await
}

#[tokio::test]
async fn a_limit_above_the_cap_is_cut_to_the_cap() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    env.execute(
        "INSERT INTO outbox (event_id, event_type, event_version, aggregate_type, aggregate_id, \
         aggregate_version, payload, occurred_at, published_at) \
         SELECT gen_random_uuid(), 'order.canceled', 1, 'order', n::text, 2, '{}', now(), now() \
         FROM generate_series(1, 1005) n",
    )
    .await;
    let api = env.start_producer().await;
    let mut served = 0;
    wait_until("a full page is served", SETTLE, async || {
        served = page(&api, "limit=5000")
            .await
            .map(|p| p.events.len())
            .unwrap_or(0);
        served > 0
    })
    .await;
    assert_eq!(served, courier::http::MAX_LIMIT as usize);
    api.stop().await
}

/// Marks the order service's first `n` events (in commit order) as published
/// ten days ago, the rest as published now.
async fn age_first_events(env: &TestEnv, n: usize) {
    env.execute("UPDATE outbox SET published_at = now()").await;
    env.execute(&format!(
        "UPDATE outbox SET published_at = now() - interval '10 days' WHERE id IN \
         (SELECT id FROM outbox WHERE publisher = 'orders' ORDER BY tx_id, id LIMIT {n})"
    ))
    .await;
}

async fn prune(env: &TestEnv, batch: i64) -> anyhow::Result<courier::outbox::prune::PruneReport> {
    let mut conn = store::connect(&env.settings.database.url()).await?;
    courier::outbox::prune::prune(&mut conn, Duration::from_secs(7 * 24 * 3600), batch).await
}

#[tokio::test]
async fn a_reader_behind_what_was_pruned_is_answered_410_naming_the_oldest_available_offset()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    for i in 0..5 {
        env.cancel_new_order(&format!("pay-pruned-{i}")).await;
    }
    let api = env.start_producer().await;
    let before: Vec<String> = read_all(&api, "0.0", 5)
        .await
        .iter()
        .map(|e| e["offset"].as_str().unwrap_or_default().to_owned())
        .collect();
    age_first_events(&env, 3).await;
    let report = prune(&env, 2).await?;
    assert_eq!(report.total(), 3, "{report:?}");

    for behind in ["0.0", before[0].as_str(), before[1].as_str()] {
        let (status, body) = get(&format!("http://{}/api/events?after={behind}", api.addr)).await?;
        assert_eq!(status, 410, "after={behind}: {body}");
        assert_eq!(body["pruned_through"], before[2], "{body}");
        assert_eq!(body["oldest_available_offset"], before[3], "{body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains("pruned")),
            "{body}"
        );
    }
    let rest = page(&api, &format!("after={}", before[2])).await?;
    let offsets: Vec<&str> = rest.events.iter().map(|e| e.offset.as_str()).collect();
    assert_eq!(offsets, [before[3].as_str(), before[4].as_str()]);
    api.stop().await
}

#[tokio::test]
async fn prune_never_removes_an_unpublished_event_nor_anything_after_it() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    for i in 0..5 {
        env.cancel_new_order(&format!("pay-prune-{i}")).await;
    }
    age_first_events(&env, 5).await;
    // The third event has not reached the broker yet.
    env.execute(
        "UPDATE outbox SET published_at = NULL WHERE id = \
         (SELECT id FROM outbox ORDER BY tx_id, id OFFSET 2 LIMIT 1)",
    )
    .await;
    // Only events whose transaction is older than every running one may go
    // (other tests' transactions on the same server count too).
    wait_until("the events are settled", SETTLE, async || {
        env.count(
            "SELECT count(*) FROM outbox WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot())",
        )
        .await
            == 5
    })
    .await;
    let report = prune(&env, 1).await?;
    assert_eq!(
        report.total(),
        2,
        "only what precedes the pending event: {report:?}"
    );
    assert_eq!(env.count("SELECT count(*) FROM outbox").await, 3);
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .await,
        1
    );

    // The operator's command does the same, and nothing is left to prune.
    let output = courier_cli(&env, &["outbox", "prune", "--older-than", "7d"])?;
    assert!(output.contains("pruned 0 event(s)"), "{output}");
    env.execute("UPDATE outbox SET published_at = now() - interval '10 days'")
        .await;
    let output = courier_cli(&env, &["outbox", "prune", "--older-than", "7d"])?;
    assert!(output.contains("pruned 3 event(s)"), "{output}");
    assert_eq!(env.count("SELECT count(*) FROM outbox").await, 0);
    Ok(())
}

/// The environment a courier binary needs to use this test's database.
fn database_env(env: &TestEnv) -> Vec<(String, String)> {
    let db = &env.settings.database;
    vec![
        (
            "COURIER_CONFIG_DIR".into(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/config").into(),
        ),
        ("COURIER__DATABASE__HOST".into(), db.host.clone()),
        ("COURIER__DATABASE__PORT".into(), db.port.to_string()),
        ("COURIER__DATABASE__USER".into(), db.user.clone()),
        (
            "COURIER__DATABASE__PASSWORD".into(),
            db.password.expose_secret().to_owned(),
        ),
        ("COURIER__DATABASE__NAME".into(), db.name.clone()),
    ]
}

fn binary(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_BIN_EXE_producer"))
        .parent()
        .unwrap_or_else(|| panic!("binaries have a directory"))
        .join(name)
}

/// Runs `courier <args>` on this test's database; its standard output.
fn courier_cli(env: &TestEnv, args: &[&str]) -> anyhow::Result<String> {
    let output = StdCommand::new(binary("courier"))
        .args(args)
        .envs(database_env(env))
        .stdin(Stdio::null())
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "courier {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

async fn applied(env: &TestEnv, reader: &str) -> Vec<store::event_reader::LoggedEvent> {
    let mut conn = env.conn().await;
    store::event_reader::log(&mut conn, reader)
        .await
        .unwrap_or_default()
}

#[tokio::test]
async fn the_pull_consumer_resumes_after_a_restart_and_applies_every_event_once()
-> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let api = env.start_producer().await;
    for i in 0..30 {
        env.cancel_new_order(&format!("pay-pull-a-{i}")).await;
    }
    let start = || {
        Command::new(binary("pull-consumer"))
            .args(["--api", &format!("http://{}", api.addr)])
            .args([
                "--reader",
                "audit",
                "--page-size",
                "3",
                "--poll-interval",
                "50ms",
            ])
            .envs(database_env(&env))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
    };
    let mut first = start()?;
    wait_until("the reader is under way", SETTLE, async || {
        applied(&env, "audit").await.len() >= 6
    })
    .await;
    // Hold the reader's offset row, give it more to read, and kill it while
    // it waits to commit a page: that page's effects must go with it.
    let mut holder = store::connect(&env.settings.database.url()).await?;
    run(&mut holder, "BEGIN").await?;
    run(
        &mut holder,
        "SELECT 1 FROM event_reader_offsets WHERE reader = 'audit' FOR UPDATE",
    )
    .await?;
    for i in 0..20 {
        env.cancel_new_order(&format!("pay-pull-b-{i}")).await;
    }
    wait_until("the reader waits to commit a page", SETTLE, async || {
        env.count(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await
            >= 1
    })
    .await;
    let pid = first.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    nix::sys::signal::kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGKILL)?;
    first.wait().await?;
    run(&mut holder, "ROLLBACK").await?;
    let at_kill = applied(&env, "audit").await.len();
    assert!(
        (6..=30).contains(&at_kill),
        "the page being committed at the kill is not applied ({at_kill})"
    );

    let mut second = start()?;
    wait_until("the restarted reader caught up", SETTLE, async || {
        applied(&env, "audit").await.len() >= 50
    })
    .await;
    second.start_kill()?;
    second.wait().await?;

    let log = applied(&env, "audit").await;
    let served = read_all(&api, "0.0", 50).await;
    let served_ids: Vec<String> = served
        .iter()
        .map(|e| e["event_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let applied_ids: Vec<String> = log.iter().map(|e| e.event_id.to_string()).collect();
    assert_eq!(
        applied_ids, served_ids,
        "every event once, in the stream's order"
    );
    api.stop().await
}

#[tokio::test]
async fn the_pull_consumer_stops_rather_than_skip_pruned_events() -> anyhow::Result<()> {
    let env = TestEnv::new().await;
    let api = env.start_producer().await;
    for i in 0..4 {
        env.cancel_new_order(&format!("pay-pull-pruned-{i}")).await;
    }
    read_all(&api, "0.0", 4).await;
    let reader =
        EventReader::new(&format!("http://{}", api.addr), "slow", env.db.clone(), 2).await?;
    assert!(matches!(reader.step().await?, Step::Read(2)));
    age_first_events(&env, 3).await;
    assert_eq!(prune(&env, 100).await?.total(), 3);

    let stopped = reader.step().await;
    assert!(
        matches!(stopped, Err(ReadError::Pruned { .. })),
        "{stopped:?}"
    );
    assert_eq!(
        applied(&env, "slow").await.len(),
        2,
        "nothing skipped ahead"
    );
    api.stop().await
}
