//! Passive health: an instance that fails requests in a row is ejected for a while.
//!
//! [`PassiveHealth`] is the state machine, pure, with time passed in; [`Ejections`]
//! shares one between the serving threads, and takes no lock while nothing fails.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Failures of one instance since its last success, and its ejection if any.
#[derive(Debug, Default)]
struct Failing {
    failures: u32,
    ejected_until: Option<Instant>,
}

/// Which instances are failing, and which are ejected until when.
#[derive(Debug)]
pub(crate) struct PassiveHealth {
    /// Only instances failing now: a success, or an ejection that ran out with no
    /// failure since, is the same as no entry.
    failing: HashMap<String, Failing>,
    eject_after: u32,
    eject_for: Duration,
}

impl PassiveHealth {
    /// Ejects an instance for `eject_for` after `eject_after` failures in a row.
    pub(crate) fn new(eject_after: u32, eject_for: Duration) -> Self {
        Self {
            failing: HashMap::new(),
            eject_after,
            eject_for,
        }
    }

    /// Records the outcome of a request to `url` at `now`. Returns whether this
    /// failure ejected it.
    pub(crate) fn record(&mut self, url: &str, ok: bool, now: Instant) -> bool {
        if ok {
            self.failing.remove(url);
            return false;
        }
        let entry = self.failing.entry(url.to_owned()).or_default();
        entry.failures += 1;
        if entry.failures < self.eject_after {
            return false;
        }
        entry.failures = 0;
        entry.ejected_until = Some(now + self.eject_for);
        true
    }

    /// The instances ejected at `now`. Forgets ejections that ran out.
    pub(crate) fn ejected(&mut self, now: Instant) -> Vec<String> {
        self.failing
            .retain(|_, f| f.failures > 0 || f.ejected_until.is_some_and(|until| now < until));
        self.failing
            .iter()
            .filter(|(_, f)| f.ejected_until.is_some_and(|until| now < until))
            .map(|(url, _)| url.clone())
            .collect()
    }

    /// Instances failing or ejected.
    pub(crate) fn len(&self) -> usize {
        self.failing.len()
    }
}

/// One [`PassiveHealth`] for every serving thread, with the count of ejections.
#[derive(Debug)]
pub(crate) struct Ejections {
    state: Mutex<PassiveHealth>,
    /// `state.len()`: while it is 0, a request takes no lock.
    failing: AtomicUsize,
    ejections: AtomicU64,
}

impl Ejections {
    pub(crate) fn new(eject_after: u32, eject_for: Duration) -> Self {
        Self {
            state: Mutex::new(PassiveHealth::new(eject_after, eject_for)),
            failing: AtomicUsize::new(0),
            ejections: AtomicU64::new(0),
        }
    }

    /// The instances ejected now (usually none, and then without a lock).
    pub(crate) fn ejected(&self) -> Vec<String> {
        if self.failing.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let ejected = state.ejected(Instant::now());
        self.failing.store(state.len(), Ordering::Release);
        ejected
    }

    /// Records the outcome of a request to `url`.
    pub(crate) fn record(&self, url: &str, ok: bool) {
        if ok && self.failing.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.record(url, ok, Instant::now()) {
            self.ejections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(url, eject_for = ?state.eject_for, "ejecting an instance after consecutive failures");
        }
        self.failing.store(state.len(), Ordering::Release);
    }

    /// Ejections so far.
    pub(crate) fn count(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_failures_should_eject_and_a_success_should_forgive() {
        let ejections = Ejections::new(2, Duration::from_secs(60));
        ejections.record("http://a", false);
        ejections.record("http://a", true);
        ejections.record("http://a", false);
        assert!(
            ejections.ejected().is_empty(),
            "a success in between resets the count"
        );
        ejections.record("http://a", false);
        assert_eq!(ejections.ejected(), vec!["http://a".to_owned()]);
        assert_eq!(ejections.count(), 1);
        // Successes of other instances, lock-free or not, leave the ejection alone.
        ejections.record("http://b", true);
        assert_eq!(ejections.ejected(), vec!["http://a".to_owned()]);
    }

    #[test]
    fn an_ejection_should_end_after_its_cool_down_and_leave_nothing_behind() {
        let ejections = Ejections::new(1, Duration::ZERO);
        ejections.record("http://a", false);
        assert!(
            ejections.ejected().is_empty(),
            "a zero cool-down is over at once"
        );
        assert_eq!(ejections.failing.load(Ordering::Relaxed), 0);
        assert_eq!(ejections.state.lock().unwrap().len(), 0);
    }

    #[test]
    fn an_ejection_should_last_exactly_its_cool_down() {
        let start = Instant::now();
        let mut health = PassiveHealth::new(3, Duration::from_secs(10));
        assert!(!health.record("http://a", false, start));
        assert!(!health.record("http://a", false, start));
        assert!(health.record("http://a", false, start), "the third ejects");
        assert_eq!(health.ejected(start + Duration::from_secs(9)), ["http://a"]);
        assert!(health.ejected(start + Duration::from_secs(10)).is_empty());
        assert_eq!(health.len(), 0, "an ejection that ran out is forgotten");
    }

    #[test]
    fn a_failure_after_an_ejection_should_count_from_zero_again() {
        let start = Instant::now();
        let mut health = PassiveHealth::new(2, Duration::from_secs(1));
        health.record("http://a", false, start);
        health.record("http://a", false, start);
        let later = start + Duration::from_secs(2);
        assert!(
            !health.record("http://a", false, later),
            "one failure is not two"
        );
        assert!(health.ejected(later).is_empty());
        assert_eq!(health.len(), 1, "still failing");
        assert!(health.record("http://a", false, later));
        assert_eq!(health.ejected(later), ["http://a"]);
    }
}
