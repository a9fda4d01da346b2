//! Idle connections, so that a client arriving when every connection slot is taken
//! can have the slot of the connection that has waited longest for a request.
//!
//! Each connection of a limited [`crate::serve`] has an [`Idle`] handle. Its owner
//! marks it waiting ([`Idle::waiting`]) while no request is under way: from the
//! start, between keep-alive requests, and while a request head trickles in (a
//! server that cannot tell, such as one that hands its connections to hyper, never
//! marks them, and they are never shed). When a new client finds every slot taken,
//! the acceptor closes the connection that has been waiting longest ([`Idle::shed`]
//! resolves for it), and the new one takes its slot. A connection mid-request is
//! never shed, nor one that has waited less than [`SHED_AFTER_MS`] (so that clients
//! that reconnect at once cannot shed one another in a loop). A slow-header attacker
//! holding every slot therefore delays a legitimate client by at most that, not
//! until the header deadline. Marking costs two atomic stores per request; the acceptor scans the connections
//! only when every slot is taken.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

/// A marker for "not waiting" in [`State::waiting_since`].
const WORKING: u64 = 0;
/// How long a connection waits before it may be shed: a client's request head
/// arrives well within it, and clients that reconnect as soon as they are shed cannot
/// shed one another in a loop.
const SHED_AFTER_MS: u64 = 100;

#[derive(Debug)]
struct State {
    /// Milliseconds from the roster's start (plus one) since the connection waits
    /// for a request, or [`WORKING`].
    waiting_since: AtomicU64,
    shed: CancellationToken,
}

/// The connections of one `serve` call.
#[derive(Debug)]
pub(crate) struct Roster {
    started: Instant,
    next_id: AtomicU64,
    connections: Mutex<HashMap<u64, Arc<State>>>,
    shed: Arc<AtomicU64>,
}

impl Roster {
    /// A roster that counts the connections it sheds in `shed`.
    pub(crate) fn new(shed: Arc<AtomicU64>) -> Self {
        Self {
            started: Instant::now(),
            next_id: AtomicU64::new(0),
            connections: Mutex::new(HashMap::new()),
            shed,
        }
    }

    /// Enrolls a new connection. It is not a candidate until its owner says it
    /// waits ([`Idle::waiting`]): servers that cannot tell never shed.
    pub(crate) fn enroll(self: &Arc<Self>) -> Idle {
        let state = Arc::new(State {
            waiting_since: AtomicU64::new(WORKING),
            shed: CancellationToken::new(),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, Arc::clone(&state));
        Idle {
            state,
            enrolled: Some((Arc::clone(self), id)),
        }
    }

    /// Closes the connection that has waited longest for a request, if it has waited
    /// at least [`SHED_AFTER_MS`]; `false` when none has.
    pub(crate) fn shed_oldest(&self) -> bool {
        let now = self.now();
        let oldest = self
            .lock()
            .values()
            .filter(|state| !state.shed.is_cancelled())
            .filter_map(|state| {
                let since = state.waiting_since.load(Ordering::Acquire);
                (since != WORKING && now.saturating_sub(since) >= SHED_AFTER_MS)
                    .then_some((since, state))
            })
            .min_by_key(|(since, _)| *since)
            .map(|(_, state)| Arc::clone(state));
        match oldest {
            Some(state) => {
                state.shed.cancel();
                self.shed.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<State>>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection's say in shedding: whether it waits for a request, and the signal
/// to close because a new client needs its slot.
#[derive(Debug)]
pub struct Idle {
    state: Arc<State>,
    enrolled: Option<(Arc<Roster>, u64)>,
}

impl Idle {
    /// A handle for a connection no roster knows (no connection limit): never shed.
    pub fn unlimited() -> Self {
        Self {
            state: Arc::new(State {
                waiting_since: AtomicU64::new(WORKING),
                shed: CancellationToken::new(),
            }),
            enrolled: None,
        }
    }

    /// The connection waits for a request (or for the rest of one's head): it may be
    /// shed from now on, the longest-waiting first.
    pub fn waiting(&self) {
        if let Some((roster, _)) = &self.enrolled {
            // Keep the first mark of a wait: a head that trickles in stays as old as
            // the wait that began it.
            let _ = self.state.waiting_since.compare_exchange(
                WORKING,
                roster.now(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    /// A request is under way: the connection is not shed until it waits again.
    pub fn working(&self) {
        self.state.waiting_since.store(WORKING, Ordering::Release);
    }

    /// Resolves when the server closes this connection to make room for a new one.
    pub async fn shed(&self) {
        self.state.shed.cancelled().await;
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        if let Some((roster, id)) = &self.enrolled {
            roster.lock().remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_waiting_longest_should_be_shed_and_a_working_one_never() {
        let roster = Arc::new(Roster::new(Arc::default()));
        let first = roster.enroll();
        let second = roster.enroll();
        let third = roster.enroll();
        assert!(!roster.shed_oldest(), "no connection said it waits");
        first.waiting();
        second.waiting();
        std::thread::sleep(std::time::Duration::from_millis(3));
        third.waiting();
        assert!(!roster.shed_oldest(), "none has waited long enough");
        std::thread::sleep(std::time::Duration::from_millis(SHED_AFTER_MS));
        first.working();
        assert!(roster.shed_oldest());
        assert!(second.state.shed.is_cancelled(), "second waited longest");
        assert!(!first.state.shed.is_cancelled() && !third.state.shed.is_cancelled());
        assert!(roster.shed_oldest());
        assert!(third.state.shed.is_cancelled());
        assert!(!roster.shed_oldest(), "the working connection stays");
        assert_eq!(roster.shed.load(Ordering::Relaxed), 2);
        drop((first, second, third));
        assert!(
            roster.lock().is_empty(),
            "dropped connections leave the roster"
        );
    }

    #[test]
    fn a_wait_should_keep_its_start_while_a_head_trickles_in() {
        let roster = Arc::new(Roster::new(Arc::default()));
        let slow = roster.enroll();
        slow.waiting();
        std::thread::sleep(std::time::Duration::from_millis(SHED_AFTER_MS));
        let fresh = roster.enroll();
        fresh.waiting();
        slow.waiting(); // more bytes of the same head
        assert!(roster.shed_oldest());
        assert!(slow.state.shed.is_cancelled() && !fresh.state.shed.is_cancelled());
    }
}
