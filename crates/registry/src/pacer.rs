//! A limit on the rate of the registry's requests to any one target (`host:port`),
//! health checks and notifications together, so that registrations cannot turn the
//! registry into a flood aimed at one address: a hundred dependents all naming the
//! same update URL are told of a change at the limit's pace, not at once.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Targets remembered at most; past it, the ones with a full bucket (idle) are
/// forgotten.
const MAX_TARGETS: usize = 10_000;

/// A token bucket per target.
#[derive(Debug)]
pub(crate) struct Pacer {
    /// Requests per second to one target, and the burst allowed.
    per_second: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Pacer {
    /// At most `per_second` requests a second to any one target (0: no limit).
    pub(crate) fn new(per_second: u32) -> Self {
        Self {
            per_second: f64::from(per_second),
            buckets: Mutex::default(),
        }
    }

    /// Waits until a request to `url`'s target may go.
    pub(crate) async fn wait_turn(&self, url: &str) {
        if self.per_second <= 0.0 {
            return;
        }
        let target = target(url);
        while let Some(wait) = self.take(target, Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes a token for `target` at `now`, or says how long until one is there.
    fn take(&self, target: &str, now: Instant) -> Option<Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_TARGETS && !buckets.contains_key(target) {
            let full = self.per_second;
            let rate = self.per_second;
            buckets.retain(|_, bucket| refilled(*bucket, now, rate, full).tokens < full);
        }
        let bucket = buckets.entry(target.to_owned()).or_insert(Bucket {
            tokens: self.per_second,
            at: now,
        });
        *bucket = refilled(*bucket, now, self.per_second, self.per_second);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }
}

fn refilled(bucket: Bucket, now: Instant, rate: f64, full: f64) -> Bucket {
    let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
    Bucket {
        tokens: (bucket.tokens + elapsed * rate).min(full),
        at: now,
    }
}

/// The `host:port` of a URL (the whole text when it is none).
fn target(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_should_get_its_burst_then_wait_while_others_go_on() {
        let pacer = Pacer::new(10);
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(pacer.take("10.0.0.1:80", now), None);
        }
        let wait = pacer.take("10.0.0.1:80", now).expect("over the limit");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert_eq!(
            pacer.take("10.0.0.2:80", now),
            None,
            "another target is not held up"
        );
        assert_eq!(
            pacer.take("10.0.0.1:80", now + Duration::from_millis(100)),
            None
        );
    }

    #[test]
    fn the_target_should_be_the_authority_of_the_url() {
        assert_eq!(target("http://10.0.0.1:80/services"), "10.0.0.1:80");
        assert_eq!(target("https://[::1]:8443/a/b"), "[::1]:8443");
        assert_eq!(target("10.0.0.1:80"), "10.0.0.1:80");
    }

    #[tokio::test]
    async fn no_limit_should_never_wait() {
        let pacer = Pacer::new(0);
        for _ in 0..1000 {
            pacer.wait_turn("http://10.0.0.1:80/x").await;
        }
    }
}
