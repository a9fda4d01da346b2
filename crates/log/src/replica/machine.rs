//! The replicated topics as a Raft state machine: applying an append command
//! appends its records to the topic's log, without syncing; a checkpoint syncs
//! every topic and describes it by its files and a summary (each topic's next
//! offset, and the producers' recent sequences).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use keel_commitlog::Offset;
use keel_raft::{Checkpoint, CheckpointFile, Command, LogId, Reply, StateMachine};
use serde::{Deserialize, Serialize};

use super::command::{Append, Outcome, ProducerSeq, encode_reply};
use crate::topics::Topics;

/// The appends of each producer remembered, to tell a retry from a new append.
pub const PRODUCER_WINDOW: usize = 5;

/// The producers remembered; past this, the one whose latest append is oldest is
/// forgotten.
pub const MAX_PRODUCERS: usize = 10_000;

/// A checkpoint's summary, from which a replica reopens to exactly its state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Each topic's next offset.
    pub topics: BTreeMap<String, Offset>,
    /// Each producer's latest appends.
    pub producers: Vec<ProducerState>,
}

/// What a replica remembers of one producer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerState {
    /// The producer's id.
    pub id: u64,
    /// The Raft log index of its latest append: the least recent is forgotten first.
    pub touched: u64,
    /// Its latest appends, by sequence, oldest first: `(sequence, start, end)`.
    pub recent: VecDeque<(u64, Offset, Offset)>,
}

impl Summary {
    /// Decodes a summary.
    ///
    /// # Errors
    ///
    /// The bytes are not a summary.
    pub fn decode(bytes: &[u8]) -> io::Result<Self> {
        serde_json::from_slice(bytes).map_err(|err| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("checkpoint summary: {err}"),
            )
        })
    }
}

/// The producers' recent appends.
#[derive(Debug, Default)]
struct Producers {
    map: HashMap<u64, ProducerState>,
}

impl Producers {
    fn from_summary(states: &[ProducerState]) -> Self {
        Self {
            map: states
                .iter()
                .map(|state| (state.id, state.clone()))
                .collect(),
        }
    }

    /// What an append tagged `tag` is: a retry of one already appended (its
    /// outcome), refused as too old to tell, or new (`None`).
    fn check(&self, tag: ProducerSeq) -> Option<Outcome> {
        let state = self.map.get(&tag.producer)?;
        if let Some(&(_, start, end)) = state.recent.iter().find(|(seq, ..)| *seq == tag.sequence) {
            return Some(Outcome::Duplicate(start..end));
        }
        let oldest = state.recent.front().map_or(0, |(seq, ..)| *seq);
        if state.recent.len() >= PRODUCER_WINDOW && tag.sequence < oldest {
            let latest = state.recent.back().map_or(0, |(seq, ..)| *seq);
            return Some(Outcome::TooOld { latest });
        }
        None
    }

    /// Remembers a new append, forgetting the oldest beyond the window, and the
    /// least recent producer beyond the limit.
    fn record(&mut self, tag: ProducerSeq, range: &Range<Offset>, index: u64) {
        let state = self
            .map
            .entry(tag.producer)
            .or_insert_with(|| ProducerState {
                id: tag.producer,
                touched: index,
                recent: VecDeque::new(),
            });
        state.touched = index;
        let at = state
            .recent
            .iter()
            .position(|(seq, ..)| *seq > tag.sequence)
            .unwrap_or(state.recent.len());
        state
            .recent
            .insert(at, (tag.sequence, range.start, range.end));
        while state.recent.len() > PRODUCER_WINDOW {
            state.recent.pop_front();
        }
        if self.map.len() > MAX_PRODUCERS
            && let Some(stalest) = self
                .map
                .values()
                .min_by_key(|state| (state.touched, state.id))
                .map(|state| state.id)
        {
            self.map.remove(&stalest);
        }
    }

    fn states(&self) -> Vec<ProducerState> {
        let mut states: Vec<ProducerState> = self.map.values().cloned().collect();
        states.sort_unstable_by_key(|state| state.id);
        states
    }
}

/// The topics of a replica, as Raft applies commands to them.
pub struct TopicMachine {
    topics: Arc<Topics>,
    producers: Producers,
}

impl std::fmt::Debug for TopicMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicMachine")
            .field("producers", &self.producers.map.len())
            .finish_non_exhaustive()
    }
}

impl TopicMachine {
    /// The state machine of `topics`, opened at `summary`'s checkpoint.
    pub(crate) fn new(topics: Arc<Topics>, summary: Option<&Summary>) -> Self {
        Self {
            topics,
            producers: summary.map_or_else(Producers::default, |summary| {
                Producers::from_summary(&summary.producers)
            }),
        }
    }

    fn apply_append(&mut self, index: u64, append: Append) -> io::Result<Vec<Outcome>> {
        let topic = self
            .topics
            .replica_topic(&append.topic)
            .map_err(io::Error::other)?;
        let start = topic.info().next_offset;
        let mut next = start;
        let mut outcomes = Vec::with_capacity(append.requests.len());
        let mut values: Vec<&[u8]> = Vec::new();
        // The tagged appends this command adds, in order, and where each is in it:
        // a command may hold thousands of a stream's writes.
        let mut fresh: Vec<(ProducerSeq, Range<Offset>)> = Vec::new();
        let mut in_command: HashMap<ProducerSeq, usize> = HashMap::new();
        for request in &append.requests {
            if let Some(tag) = request.tag {
                let earlier = in_command
                    .get(&tag)
                    .map(|&at| Outcome::Duplicate(fresh[at].1.clone()));
                if let Some(outcome) = earlier.or_else(|| self.producers.check(tag)) {
                    outcomes.push(outcome);
                    continue;
                }
            }
            let range = next..next + request.values.len() as u64;
            next = range.end;
            values.extend(request.values.iter().map(Bytes::as_ref));
            if let Some(tag) = request.tag {
                in_command.insert(tag, fresh.len());
                fresh.push((tag, range.clone()));
            }
            outcomes.push(Outcome::Appended(range));
        }
        if !values.is_empty() {
            let appended = topic
                .apply(&values, append.timestamp_ms)
                .map_err(io::Error::other)?;
            if appended != (start..next) {
                return Err(io::Error::other(format!(
                    "topic {:?}: the records went to offsets {appended:?}, not {:?}: the replica has diverged",
                    append.topic,
                    start..next
                )));
            }
        }
        for (tag, range) in fresh {
            self.producers.record(tag, &range, index);
        }
        Ok(outcomes)
    }
}

impl StateMachine for TopicMachine {
    fn apply(&mut self, log_id: &LogId, command: &Command) -> io::Result<Reply> {
        let append = match Append::decode(command.0.clone()) {
            Ok(append) => append,
            Err(err) => {
                // Every replica decodes it alike; the proposer sees no outcomes.
                tracing::error!(index = log_id.index, error = %err, "skipping a malformed command");
                return Ok(Reply(encode_reply(&[])));
            }
        };
        let outcomes = self.apply_append(log_id.index, append)?;
        Ok(Reply(encode_reply(&outcomes)))
    }

    fn checkpoint(&mut self) -> io::Result<Checkpoint> {
        let mut summary = Summary {
            topics: BTreeMap::new(),
            producers: self.producers.states(),
        };
        let mut files = Vec::new();
        for (name, topic) in self.topics.replica_topics() {
            summary
                .topics
                .insert(name.clone(), topic.info().next_offset);
            for (path, len) in topic.checkpoint_files().map_err(io::Error::other)? {
                let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                files.push(CheckpointFile {
                    name: format!("{name}/{file_name}"),
                    path,
                    len,
                });
            }
        }
        let state = serde_json::to_vec(&summary).map_err(io::Error::other)?;
        Ok(Checkpoint { files, state })
    }

    fn install(&mut self, data: &Path, state: &[u8]) -> io::Result<()> {
        let summary = Summary::decode(state)?;
        self.topics
            .replace_replica(data, &summary)
            .map_err(io::Error::other)?;
        self.producers = Producers::from_summary(&summary.producers);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(producer: u64, sequence: u64) -> ProducerSeq {
        ProducerSeq { producer, sequence }
    }

    #[test]
    fn a_retried_sequence_should_be_a_duplicate_within_the_window_and_refused_past_it() {
        let mut producers = Producers::default();
        for seq in 1..=10u64 {
            assert_eq!(producers.check(tag(7, seq)), None, "seq {seq} is new");
            producers.record(tag(7, seq), &(seq * 10..seq * 10 + 1), seq);
        }
        assert_eq!(
            producers.check(tag(7, 10)),
            Some(Outcome::Duplicate(100..101))
        );
        assert_eq!(producers.check(tag(7, 6)), Some(Outcome::Duplicate(60..61)));
        assert_eq!(
            producers.check(tag(7, 5)),
            Some(Outcome::TooOld { latest: 10 })
        );
        assert_eq!(producers.check(tag(7, 11)), None);
        assert_eq!(producers.check(tag(8, 1)), None, "producers are apart");
    }

    #[test]
    fn a_sequence_skipped_inside_the_window_should_still_append() {
        let mut producers = Producers::default();
        for seq in [1u64, 2, 4] {
            producers.record(tag(1, seq), &(seq..seq + 1), seq);
        }
        assert_eq!(producers.check(tag(1, 3)), None, "3 was never appended");
        producers.record(tag(1, 3), &(9..10), 5);
        assert_eq!(producers.check(tag(1, 3)), Some(Outcome::Duplicate(9..10)));
    }

    #[test]
    fn the_least_recent_producer_should_be_forgotten_past_the_limit() {
        let mut producers = Producers::default();
        for id in 1..=(MAX_PRODUCERS as u64 + 1) {
            producers.record(tag(id, 1), &(id..id + 1), id);
        }
        assert_eq!(producers.map.len(), MAX_PRODUCERS);
        assert!(
            !producers.map.contains_key(&1),
            "producer 1 was the least recent"
        );
        assert!(producers.map.contains_key(&2));
    }
}
