//! The benchmark runs end to end and writes a well-formed table. Speed is
//! never asserted: this machine is shared and a test is no measurement.

use std::path::{Path, PathBuf};

use courier::{
    bench::{self, BenchOptions, env::Management},
    config::Settings,
};

use crate::helpers::MANAGEMENT;

#[tokio::test]
async fn the_quick_bench_runs_end_to_end_and_writes_a_well_formed_table_and_per_order_timings()
-> anyhow::Result<()> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let settings = Settings::load_from(&repo.join("config"), "test")?;
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_producer"))
        .parent()
        .ok_or_else(|| anyhow::anyhow!("binaries have a directory"))?
        .to_owned();
    let out_dir = std::env::temp_dir().join(format!("courier-bench-smoke-{}", std::process::id()));
    let options = BenchOptions {
        orders: 30,
        clients: 8,
        repetitions: 1,
        broker_messages: 200,
        db_ops: 20,
        db_connections: vec![1, 4],
        open_loop_seconds: 0.5,
        open_loop_fractions: vec![0.5],
        open_loop_rates: Vec::new(),
        backlog: 30,
        skip_peer: false,
        bin_dir,
        log_dir: out_dir.join("logs"),
        peer_dir: repo.join("bench/peer"),
        venv: repo.join("var/bench-venv"),
        out_dir: out_dir.clone(),
        timings_dir: Some(out_dir.join("timings")),
        repo,
        management: Management {
            url: MANAGEMENT.to_owned(),
            user: "guest".to_owned(),
            password: "guest".to_owned(),
        },
        command: "bench smoke test".to_owned(),
        show_progress: false,
    };
    let results = bench::run(&settings, &options).await?;
    assert!(results.unclean.is_empty(), "{:?}", results.unclean);
    assert!(
        results.peer.is_ok(),
        "the Celery peer ran: {:?}",
        results.peer.as_ref().err()
    );

    let table = results.markdown_table();
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows.len() > 20, "{table}");
    for row in &rows {
        assert!(row.starts_with('|') && row.ends_with('|'), "{row}");
        assert_eq!(row.matches('|').count(), 4, "three columns: {row}");
    }
    for figure in [
        "broker limit",
        "database limit: cancel tx on 4 conn",
        "pipeline: orders/s",
        "cancel→refund latency",
        "peak RSS consumer",
        "CPU s / 1,000 orders: postgres",
        "DB per order",
        "open loop 50 %",
        "backlog of 30 orders",
        "Celery peer: orders/s",
    ] {
        assert!(table.contains(figure), "`{figure}` missing:\n{table}");
    }
    // Counted by the binaries themselves: a figure, not "n/a".
    let statements = rows
        .iter()
        .find(|row| row.contains("statements sent by producer and consumer"))
        .and_then(|row| row.split('|').nth(2))
        .and_then(|value| value.split_whitespace().next()?.parse::<f64>().ok());
    assert!(
        statements.is_some_and(|n| n > 0.0),
        "statements per order: {statements:?}\n{table}"
    );
    let written = std::fs::read_to_string(out_dir.join("BENCHMARKS.md"))?;
    assert!(
        written.contains(bench::report::BEGIN) && written.contains(&table),
        "{written}"
    );
    for (_, file) in &results.plots {
        let svg = std::fs::read_to_string(out_dir.join(file))?;
        assert!(svg.contains("<svg"), "{file}");
    }
    assert_eq!(results.plots.len(), 2);
    // One line per order under the header, every order with its publish.
    let closed = std::fs::read_to_string(out_dir.join("timings/closed-loop-1.csv"))?;
    let lines: Vec<&str> = closed.lines().collect();
    assert_eq!(lines.len(), 1 + 30, "{closed}");
    assert!(lines[0].starts_with("canceled_at,published_at,refunded_at"));
    assert!(
        lines[1..]
            .iter()
            .all(|l| l.split(',').all(|field| !field.is_empty())),
        "{closed}"
    );
    let open = std::fs::read_dir(out_dir.join("timings"))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("open-loop-"))
        .count();
    assert_eq!(open, 1, "one open-loop run, one file");
    std::fs::remove_dir_all(out_dir)?;
    Ok(())
}
