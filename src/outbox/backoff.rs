//! When a failed publish is tried again: exponential in the attempts so far,
//! capped, so a broker outage does not turn into a publish storm.

use std::time::Duration;

/// `base * 2^attempts`, at most `max`.
pub fn delay_after(attempts: u32, base: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(attempts.min(30));
    base.saturating_mul(factor).min(max)
}

/// How long a broker or database client waits before its next reconnect:
/// 200 ms doubling to 10 s, jittered.
pub fn reconnect_delay(failures: u32) -> Duration {
    jittered(delay_after(
        failures,
        Duration::from_millis(200),
        Duration::from_secs(10),
    ))
}

/// Between half and all of `delay`, at random, so that many processes
/// reconnecting after one outage do not all knock at the same instant.
pub fn jittered(delay: Duration) -> Duration {
    let half = delay / 2;
    half + half.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        assert_eq!(delay_after(0, base, max), Duration::from_secs(1));
        assert_eq!(delay_after(3, base, max), Duration::from_secs(8));
        assert_eq!(delay_after(6, base, max), Duration::from_secs(60));
        assert_eq!(delay_after(u32::MAX, base, max), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_delay() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(5) && d <= Duration::from_secs(10),
                "{d:?}"
            );
        }
    }
}
