//! The run's two pictures, as SVG (plotters): the histogram of cancel→refund
//! latencies of the closed-loop run at maximum throughput, and latency
//! against achieved rate for the open-loop levels and the maximum.

use std::path::Path;

use plotters::prelude::*;

fn failed(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing failed: {e}")
}

/// Latencies (ms) in 40 buckets up to their 99.5th percentile; the slower
/// tail is counted in the last bucket.
pub fn latency_histogram(path: &Path, title: &str, latencies_ms: &[f64]) -> anyhow::Result<()> {
    let mut sorted: Vec<f64> = latencies_ms
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    sorted.sort_by(f64::total_cmp);
    let Some(&last) = sorted.last() else {
        anyhow::bail!("no latencies to draw");
    };
    let cut = sorted[((sorted.len() as f64 * 0.995) as usize).min(sorted.len() - 1)].max(1.0);
    let buckets = 40usize;
    let width = cut / buckets as f64;
    let mut counts = vec![0u32; buckets];
    for v in &sorted {
        let i = ((v / width) as usize).min(buckets - 1);
        counts[i] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1);

    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(failed)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..cut, 0u32..top + top / 10 + 1)
        .map_err(failed)?;
    chart
        .configure_mesh()
        .x_desc(format!(
            "cancel → refund latency, ms (last bar: ≥ {cut:.0} ms, max {last:.0} ms)"
        ))
        .y_desc("orders")
        .draw()
        .map_err(failed)?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, count)| {
            let x0 = i as f64 * width;
            Rectangle::new(
                [(x0, 0), (x0 + width * 0.9, *count)],
                BLUE.mix(0.6).filled(),
            )
        }))
        .map_err(failed)?;
    root.present().map_err(failed)?;
    Ok(())
}

/// One point of the curve: achieved orders/s, p50 and p99 latency in ms.
#[derive(Debug, Clone, Copy)]
pub struct RatePoint {
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

pub fn rate_vs_latency(path: &Path, title: &str, points: &[RatePoint]) -> anyhow::Result<()> {
    let mut points = points.to_vec();
    points.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let max_rate = points.iter().map(|p| p.rate).fold(1.0, f64::max) * 1.1;
    let max_ms = points.iter().map(|p| p.p99_ms).fold(1.0, f64::max) * 1.2;

    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(failed)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_rate, 0f64..max_ms)
        .map_err(failed)?;
    chart
        .configure_mesh()
        .x_desc("achieved orders/s")
        .y_desc("cancel → refund latency, ms")
        .draw()
        .map_err(failed)?;
    for (label, color, pick) in [
        (
            "p50",
            BLUE,
            (|p: &RatePoint| p.p50_ms) as fn(&RatePoint) -> f64,
        ),
        ("p99", RED, |p: &RatePoint| p.p99_ms),
    ] {
        let series: Vec<(f64, f64)> = points.iter().map(|p| (p.rate, pick(p))).collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
            .map_err(failed)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                series
                    .into_iter()
                    .map(|xy| Circle::new(xy, 4, color.filled())),
            )
            .map_err(failed)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(failed)?;
    root.present().map_err(failed)?;
    Ok(())
}
