//! What clients did (a [`History`] of operations) and what nodes hold at the end
//! ([`FinalState`]), as written to and read from `target/chaos/` (JSON lines).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

/// One client operation against the log cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OpKind {
    /// Append `value` (unique within a run) to the topic under test.
    Append {
        /// The value.
        value: String,
    },
    /// Read the whole topic with linearizable consistency: the values read, in
    /// offset order (set when the read completed).
    LinearizableRead {
        /// The values read.
        #[serde(default)]
        values: Vec<String>,
    },
    /// Register `instance` (its id) as an instance of `service` in the registry.
    Register {
        /// The service.
        service: String,
        /// The instance's id.
        instance: String,
    },
    /// Deregister it; an answer that it was not registered counts as done.
    Deregister {
        /// The service.
        service: String,
        /// The instance's id.
        instance: String,
    },
    /// A linearizable (`?consistent`) lookup of `service`: the instances found.
    Lookup {
        /// The service.
        service: String,
        /// The instances' ids.
        #[serde(default)]
        instances: Vec<String>,
    },
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged; an append's acknowledgement names its offset.
    Ok {
        /// The acknowledged offset, for an append.
        #[serde(default)]
        offset: Option<u64>,
    },
    /// Refused for sure: it did not happen.
    Fail,
    /// No answer (a timeout, a broken connection): it may or may not have happened.
    Unknown,
}

/// One operation: who, what, when it was invoked and completed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// The client that ran it.
    pub process: u64,
    /// What it did.
    #[serde(flatten)]
    pub kind: OpKind,
    /// When it was invoked, in milliseconds since the run began.
    pub invoked_ms: u64,
    /// When it completed (for an unknown outcome: when the client gave up).
    pub completed_ms: u64,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Every operation of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// In the order they completed.
    pub ops: Vec<Op>,
}

/// What each node holds once the faults are healed: its records of the topic under
/// test, `(offset, value)` in offset order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalState {
    /// By node name.
    pub nodes: BTreeMap<String, Vec<(u64, String)>>,
}

/// What each registry node holds once the faults are healed: `service/instance`
/// of every instance it lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryState {
    /// By node name.
    pub nodes: BTreeMap<String, std::collections::BTreeSet<String>>,
}

impl FinalState {
    /// Whether every node holds the same records.
    pub fn agrees(&self) -> bool {
        all_equal(self.nodes.values())
    }
}

impl RegistryState {
    /// Whether every node lists the same instances.
    pub fn agrees(&self) -> bool {
        all_equal(self.nodes.values())
    }
}

fn all_equal<T: PartialEq>(mut values: impl Iterator<Item = T>) -> bool {
    let Some(first) = values.next() else {
        return true;
    };
    values.all(|value| value == first)
}

/// A history that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// Reading or writing failed.
    #[error("history: {0}")]
    Io(#[from] std::io::Error),
    /// A line is not an operation.
    #[error("history line {line}: {source}")]
    Line {
        /// 1-based.
        line: usize,
        /// Why.
        source: serde_json::Error,
    },
}

impl History {
    /// Writes one operation per line.
    ///
    /// # Errors
    ///
    /// Writing failed.
    pub fn write_jsonl(&self, mut out: impl Write) -> Result<(), HistoryError> {
        for op in &self.ops {
            serde_json::to_writer(&mut out, op).map_err(std::io::Error::other)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Reads what [`History::write_jsonl`] wrote; blank lines are skipped.
    ///
    /// # Errors
    ///
    /// Reading failed, or a line is not an operation (named by its number).
    pub fn read_jsonl(input: impl BufRead) -> Result<Self, HistoryError> {
        let mut ops = Vec::new();
        for (at, line) in input.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let op = serde_json::from_str(&line).map_err(|source| HistoryError::Line {
                line: at + 1,
                source,
            })?;
            ops.push(op);
        }
        Ok(Self { ops })
    }
}
