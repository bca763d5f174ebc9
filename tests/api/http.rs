//! Slow, idle and too many clients cannot lock an HTTP service out
//! (`courier::http::serve`, `[http]` in the settings), shown on the order API
//! with raw TCP clients that misbehave on purpose.

use std::time::Duration;

use anyhow::Context;
use figment::providers::Serialized;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use crate::{
    faults::harness::{PRODUCER, Run},
    helpers::{Service, TestEnv},
};

/// A test environment and its order API with these connection limits.
async fn api_with(
    header_read_timeout: &str,
    idle_timeout: &str,
    max_connections: usize,
) -> (TestEnv, Service) {
    let (header_read_timeout, idle_timeout) =
        (header_read_timeout.to_owned(), idle_timeout.to_owned());
    let env = TestEnv::with(move |figment| {
        figment
            .merge(Serialized::default(
                "http.header_read_timeout",
                header_read_timeout,
            ))
            .merge(Serialized::default("http.idle_timeout", idle_timeout))
            .merge(Serialized::default("http.max_connections", max_connections))
    })
    .await;
    let producer = env.start_producer().await;
    (env, producer)
}

/// A connection that sent only the start of a request line, and then nothing.
async fn half_open(api: &Service) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(api.addr).await?;
    stream.write_all(b"GET /healthz HT").await?;
    Ok(stream)
}

/// Reads (and drops) whatever the server still sends until it closes the
/// connection; fails if it has not closed it `within`. Returns how long that took.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut buffer = [0_u8; 1024];
    tokio::time::timeout(within, async {
        while stream.read(&mut buffer).await? > 0 {}
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("the server did not close the connection within {within:?}"))??;
    Ok(started.elapsed())
}

/// Sends one keep-alive `GET /healthz` and reads its whole answer, leaving
/// the connection open and idle.
async fn health_check_kept_alive(stream: &mut TcpStream) -> anyhow::Result<()> {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: courier\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    let mut buffer = [0_u8; 1024];
    while !answer.ends_with(b"\r\n\r\nok") {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
            .await
            .context("no answer to GET /healthz within 10s")??;
        anyhow::ensure!(
            read > 0,
            "the server closed the connection mid-answer: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buffer[..read]);
    }
    let answer = String::from_utf8_lossy(&answer);
    anyhow::ensure!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    anyhow::ensure!(
        !answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    Ok(())
}

#[tokio::test]
async fn half_open_connections_beyond_the_cap_cannot_lock_the_api_out() -> anyhow::Result<()> {
    let (_env, api) = api_with("1s", "60s", 8).await;
    let mut attackers = Vec::new();
    for _ in 0..20 {
        attackers.push(half_open(&api).await?);
    }

    // 20 half-open connections fill the cap of 8 two and a half times over;
    // each round is closed after the 1 s header timeout (the 60 s idle
    // timeout plays no part), so the real request, queued behind them in the
    // backlog, is served after about 3 s.
    let response = reqwest::Client::new()
        .get(format!("http://{}/healthz", api.addr))
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .context("a real request was not answered while half-open connections held the API")?;
    anyhow::ensure!(response.status() == 200, "{response:?}");
    anyhow::ensure!(response.text().await? == "ok");

    for (i, attacker) in attackers.iter_mut().enumerate() {
        closed_by_server(attacker, Duration::from_secs(15))
            .await
            .with_context(|| format!("half-open connection {i}"))?;
    }
    api.stop().await
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_in_the_backlog_until_one_closes() -> anyhow::Result<()> {
    let (_env, api) = api_with("30s", "60s", 4).await;
    let mut attackers = Vec::new();
    for _ in 0..4 {
        attackers.push(half_open(&api).await?);
    }
    let mut waiting = TcpStream::connect(api.addr).await?;
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: courier\r\nConnection: close\r\n\r\n")
        .await?;

    // Proving an absence takes a bounded wait: with the cap ignored, the
    // answer would be here in a few milliseconds.
    let mut buffer = [0_u8; 1024];
    let early = tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut buffer)).await;
    anyhow::ensure!(
        early.is_err(),
        "a fifth connection was served while the cap of 4 was full: {early:?}"
    );

    drop(attackers.pop());
    let read = tokio::time::timeout(Duration::from_secs(10), waiting.read(&mut buffer))
        .await
        .context("the waiting connection was not served after a place under the cap freed")??;
    let answer = String::from_utf8_lossy(&buffer[..read]);
    anyhow::ensure!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    drop(attackers);
    api.stop().await
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() -> anyhow::Result<()> {
    // A header timeout far beyond the deadline: only the idle timeout can close it.
    let (_env, api) = api_with("30s", "1s", 8).await;
    let mut client = TcpStream::connect(api.addr).await?;
    health_check_kept_alive(&mut client).await?;

    let idle_for = closed_by_server(&mut client, Duration::from_secs(10)).await?;
    anyhow::ensure!(
        idle_for >= Duration::from_millis(900),
        "closed after {idle_for:?}: the connection was not kept alive until the idle timeout"
    );
    api.stop().await
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_also_closed_after_the_header_read_timeout()
-> anyhow::Result<()> {
    // hyper restarts its header-read clock whenever a connection goes idle;
    // config/default.toml relies on that. An idle timeout far beyond the
    // deadline: only the header-read timeout can close it.
    let (_env, api) = api_with("1s", "60s", 8).await;
    let mut client = TcpStream::connect(api.addr).await?;
    health_check_kept_alive(&mut client).await?;

    let idle_for = closed_by_server(&mut client, Duration::from_secs(10)).await?;
    anyhow::ensure!(
        idle_for >= Duration::from_millis(900),
        "closed after {idle_for:?}: the connection was not kept alive until the header timeout"
    );
    api.stop().await
}

#[tokio::test]
async fn a_request_body_that_stops_arriving_is_cut_off_after_the_idle_timeout() -> anyhow::Result<()>
{
    // The head is complete, so hyper's header timer is done; only the idle
    // timeout can end the wait for the rest of the body.
    let (env, api) = api_with("30s", "1s", 8).await;
    let mut client = TcpStream::connect(api.addr).await?;
    client
        .write_all(
            b"POST /orders HTTP/1.1\r\nHost: courier\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"payment_id\": \"pay-slow-1\"",
        )
        .await?;

    closed_by_server(&mut client, Duration::from_secs(10)).await?;
    anyhow::ensure!(env.count("SELECT count(*) FROM orders").await == 0);
    api.stop().await
}

#[tokio::test]
async fn running_out_of_file_descriptors_pauses_accepting_and_the_api_recovers()
-> anyhow::Result<()> {
    let started = Instant::now();
    let mut run = Run::new(|figment| figment).await;
    run.set_env(
        PRODUCER,
        &[
            ("COURIER__HTTP__HEADER_READ_TIMEOUT", "2s"),
            ("NO_COLOR", "1"),
        ],
    );
    run.spawn(PRODUCER).await;
    let pid = run.pid(PRODUCER).context("the producer did not start")?;

    // Leave the real producer room for 16 more connections, far below the
    // cap of 512: its accepts then fail with EMFILE, as in issue 6.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let limit = open + 16;
    let limited = tokio::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .await?;
    anyhow::ensure!(limited.success(), "prlimit failed: {limited}");
    // The kernel completes these handshakes whether or not the producer can accept.
    let mut attackers = Vec::new();
    for _ in 0..48 {
        attackers.push(TcpStream::connect(run.settings.producer.listen).await?);
    }
    run.wait_for_log(
        PRODUCER,
        "accept failed",
        "the producer never ran out of file descriptors",
    )
    .await;

    let health = format!("http://{}/healthz", run.settings.producer.listen);
    let response = reqwest::Client::new()
        .get(&health)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .context("the API did not recover once the idle connections were closed")?;
    anyhow::ensure!(response.status() == 200, "{response:?}");
    run.wait_for_log(
        PRODUCER,
        "accepting again",
        "no end of the episode was logged",
    )
    .await;
    for (i, attacker) in attackers.iter_mut().enumerate() {
        closed_by_server(attacker, Duration::from_secs(30))
            .await
            .with_context(|| format!("idle connection {i}"))?;
    }

    // Paced, not spinning: one failed accept per pause at most. Logged once
    // per episode, not per failure, nor per wave of connections (the 48 come
    // in 3 waves of 16): an episode lasts until nobody waits in the backlog.
    let log = std::fs::read_to_string(run.log_path(PRODUCER))?;
    let failed: u64 = log
        .lines()
        .filter_map(|line| line.split("failed_accepts=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    let paced = started.elapsed().as_millis() / 100 + 10;
    anyhow::ensure!(
        failed > 0 && u128::from(failed) <= paced,
        "{failed} failed accepts in {:?}",
        started.elapsed()
    );
    let episodes = run.log_count(PRODUCER, "accept failed");
    anyhow::ensure!(
        (1..=2).contains(&episodes),
        "{episodes} log lines for {failed} failed accepts"
    );
    anyhow::ensure!(run.pid(PRODUCER) == Some(pid), "the producer was restarted");
    let clean = run.stop_all().await;
    anyhow::ensure!(clean.get(PRODUCER) == Some(&true), "{clean:?}");
    Ok(())
}
