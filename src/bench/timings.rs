//! Every order's timestamps of one run as a CSV file (`bench --timings-dir`),
//! for what a percentile hides: whether the tail is a few stalls or the
//! whole run, and which hop it sits in.

use std::{
    fs,
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
};

use chrono::{DateTime, SecondsFormat, Utc};

use crate::store::metrics::RefundTiming;

const HEADER: &str =
    "canceled_at,published_at,refunded_at,cancel_to_published_ms,cancel_to_refund_ms";

/// Writes `timings` to `<dir>/<name>.csv` (the directory is created) and
/// returns the file's path. `published_at` is empty where there is no outbox.
pub fn write_csv(dir: &Path, name: &str, timings: &[RefundTiming]) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let path = dir.join(format!("{name}.csv"));
    let mut out = BufWriter::new(fs::File::create(&path)?);
    writeln!(out, "{HEADER}")?;
    for t in timings {
        writeln!(out, "{}", line(t))?;
    }
    out.flush()?;
    Ok(path)
}

fn line(t: &RefundTiming) -> String {
    let ms = |value: f64| format!("{value:.3}");
    format!(
        "{},{},{},{},{}",
        stamp(t.canceled_at),
        t.published_at.map(stamp).unwrap_or_default(),
        stamp(t.refunded_at),
        t.cancel_to_published_ms().map(ms).unwrap_or_default(),
        ms(t.cancel_to_refund_ms()),
    )
}

fn stamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(micros: i64) -> anyhow::Result<DateTime<Utc>> {
        DateTime::from_timestamp_micros(1_800_000_000_000_000 + micros)
            .ok_or_else(|| anyhow::anyhow!("{micros} µs is out of range"))
    }

    #[test]
    fn a_timing_line_carries_its_stamps_and_both_latencies() -> anyhow::Result<()> {
        let timing = RefundTiming {
            canceled_at: at(0)?,
            refunded_at: at(25_500)?,
            published_at: Some(at(12_250)?),
        };
        assert_eq!(
            line(&timing),
            "2027-01-15T08:00:00.000000Z,2027-01-15T08:00:00.012250Z,\
             2027-01-15T08:00:00.025500Z,12.250,25.500"
        );
        Ok(())
    }

    #[test]
    fn a_timing_without_an_outbox_row_leaves_its_published_columns_empty() -> anyhow::Result<()> {
        let timing = RefundTiming {
            canceled_at: at(0)?,
            refunded_at: at(1_000)?,
            published_at: None,
        };
        assert_eq!(
            line(&timing),
            "2027-01-15T08:00:00.000000Z,,2027-01-15T08:00:00.001000Z,,1.000"
        );
        Ok(())
    }

    #[test]
    fn the_csv_file_starts_with_its_header() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("courier-timings-{}", std::process::id()));
        let path = write_csv(&dir, "closed-1", &[])?;
        let text = fs::read_to_string(&path)?;
        fs::remove_dir_all(&dir)?;
        assert_eq!(text, format!("{HEADER}\n"));
        assert_eq!(
            path.file_name().and_then(|n| n.to_str()),
            Some("closed-1.csv")
        );
        Ok(())
    }
}
