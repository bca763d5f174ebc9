//! Small statistics: a figure measured several times (median and spread) and
//! latency percentiles. Pure; no IO.

use std::fmt;

/// A figure repeated several times: its median and its spread (min–max).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Spread {
    /// `None` for no values; NaNs are ignored.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            runs: n,
        })
    }
}

/// Formats a number for a table: thousands separated, `decimals` after the point.
pub fn number(value: f64, decimals: usize) -> String {
    let text = format!("{value:.decimals$}");
    let (int, frac) = match text.split_once('.') {
        Some((int, frac)) => (int.to_owned(), Some(frac.to_owned())),
        None => (text, None),
    };
    let (sign, digits) = match int.strip_prefix('-') {
        Some(rest) => ("-", rest.to_owned()),
        None => ("", int),
    };
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match frac {
        Some(frac) => format!("{sign}{grouped}.{frac}"),
        None => format!("{sign}{grouped}"),
    }
}

impl Spread {
    pub fn display(&self, decimals: usize) -> SpreadDisplay {
        SpreadDisplay(*self, decimals)
    }
}

/// `median (min–max)`.
pub struct SpreadDisplay(Spread, usize);

impl fmt::Display for SpreadDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self(spread, decimals) = self;
        write!(
            f,
            "{} ({}–{})",
            number(spread.median, *decimals),
            number(spread.min, *decimals),
            number(spread.max, *decimals)
        )
    }
}

/// Latency percentiles of one run, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub count: usize,
}

impl Percentiles {
    /// Nearest-rank percentiles; `None` for no samples.
    pub fn of(samples_ms: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = samples_ms.iter().copied().filter(|v| !v.is_nan()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let index = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted[index.clamp(1, sorted.len()) - 1]
        };
        Some(Self {
            p50: rank(50.0),
            p95: rank(95.0),
            p99: rank(99.0),
            max: sorted[sorted.len() - 1],
            count: sorted.len(),
        })
    }
}

/// The spread of each percentile over several runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PercentileSpread {
    pub p50: Spread,
    pub p95: Spread,
    pub p99: Spread,
    pub max: Spread,
}

impl PercentileSpread {
    pub fn of(runs: &[Percentiles]) -> Option<Self> {
        let pick = |f: fn(&Percentiles) -> f64| Spread::of(&runs.iter().map(f).collect::<Vec<_>>());
        Some(Self {
            p50: pick(|p| p.p50)?,
            p95: pick(|p| p.p95)?,
            p99: pick(|p| p.p99)?,
            max: pick(|p| p.max)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let spread = Spread::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!(
            spread,
            Some(Spread {
                median: 2.5,
                min: 1.0,
                max: 4.0,
                runs: 4
            })
        );
        assert_eq!(Spread::of(&[]), None);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&samples);
        assert_eq!(
            p.map(|p| (p.p50, p.p95, p.p99, p.max)),
            Some((50.0, 95.0, 99.0, 100.0))
        );
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(number(1234567.891, 1), "1,234,567.9");
        assert_eq!(number(-999.0, 0), "-999");
        assert_eq!(number(0.25, 2), "0.25");
    }
}
