//! The checker: what a history and the nodes' final contents show that keel's
//! guarantees forbid.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::history::{FinalState, History, OpKind, Outcome};

/// One thing that should not have happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "violation", rename_all = "snake_case")]
pub enum Violation {
    /// An acknowledged append is not on a node, or not at the offset its
    /// acknowledgement gave.
    Lost {
        /// The value.
        value: String,
        /// The acknowledged offset.
        offset: u64,
        /// The node.
        node: String,
        /// Where the node has it instead, if anywhere.
        found_at: Option<u64>,
    },
    /// A value stored more than once on a node.
    Duplicated {
        /// The value.
        value: String,
        /// The node.
        node: String,
        /// Its offsets there.
        offsets: Vec<u64>,
    },
    /// A node's records differ from the others'.
    Divergent {
        /// The node.
        node: String,
        /// The first offset where it differs from the most common contents.
        at: u64,
    },
    /// A node's offsets are not dense from 0.
    Gap {
        /// The node.
        node: String,
        /// The offset expected next.
        expected: u64,
        /// The offset found.
        found: u64,
    },
    /// A node holds a value no client ever tried to append.
    Phantom {
        /// The value.
        value: String,
        /// The node.
        node: String,
    },
    /// A registry node does not list an instance whose registration was the last
    /// thing acknowledged of it.
    LostRegistration {
        /// `service/instance`.
        instance: String,
        /// The node.
        node: String,
    },
    /// A registry node lists an instance whose deregistration was the last thing
    /// acknowledged of it.
    Resurrected {
        /// `service/instance`.
        instance: String,
        /// The node.
        node: String,
    },
    /// A registry node's instances differ from the first node's.
    DivergentTable {
        /// The node.
        node: String,
        /// How many instances one lists and the other does not.
        differences: usize,
    },
    /// A `?consistent` lookup showed an instance otherwise than the writes
    /// acknowledged before it began left it.
    StaleLookup {
        /// The looking-up client.
        process: u64,
        /// When the lookup began.
        invoked_ms: u64,
        /// `service/instance`.
        instance: String,
        /// Whether it should have been listed.
        expected_present: bool,
    },
    /// A linearizable read missed an append acknowledged before the read began.
    StaleRead {
        /// The reading client.
        process: u64,
        /// When the read began.
        invoked_ms: u64,
        /// The append it missed.
        missed: String,
    },
}

/// What a run did, in numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Operations in the history.
    pub operations: usize,
    /// Appends acknowledged.
    pub acknowledged: usize,
    /// Acknowledged appends missing (or misplaced) on at least one node.
    pub lost: usize,
    /// Values stored twice on at least one node.
    pub duplicated: usize,
    /// Nodes whose contents differ from the most common.
    pub divergent: usize,
    /// Linearizable reads that missed an acknowledged append.
    pub stale_reads: usize,
}

/// The checker's judgement of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The numbers.
    pub counts: Counts,
    /// Everything that should not have happened (empty: the run passed).
    pub violations: Vec<Violation>,
}

impl Verdict {
    /// Whether the run kept every guarantee.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Judges a run: its history and what each node held once the faults were healed.
pub fn check(history: &History, state: &FinalState) -> Verdict {
    let mut violations = Vec::new();
    let mut sent = BTreeSet::new();
    let mut acked: BTreeMap<&str, u64> = BTreeMap::new();
    for op in &history.ops {
        if let OpKind::Append { value } = &op.kind {
            sent.insert(value.as_str());
            if let Outcome::Ok {
                offset: Some(offset),
            } = op.outcome
            {
                acked.insert(value.as_str(), offset);
            }
        }
    }

    let mut lost = BTreeSet::new();
    let mut duplicated = BTreeSet::new();
    for (node, records) in &state.nodes {
        let mut at: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (expected, (offset, _)) in (0u64..).zip(records) {
            if *offset != expected {
                violations.push(Violation::Gap {
                    node: node.clone(),
                    expected,
                    found: *offset,
                });
                break;
            }
        }
        for (offset, value) in records {
            at.entry(value.as_str()).or_default().push(*offset);
            if !sent.contains(value.as_str()) {
                violations.push(Violation::Phantom {
                    value: value.clone(),
                    node: node.clone(),
                });
            }
        }
        for (value, offsets) in &at {
            if offsets.len() > 1 {
                duplicated.insert(value.to_string());
                violations.push(Violation::Duplicated {
                    value: (*value).to_owned(),
                    node: node.clone(),
                    offsets: offsets.clone(),
                });
            }
        }
        for (value, offset) in &acked {
            // Where it is: at its acknowledged offset if there (a value stored
            // twice is a duplicate, not a loss), else where first found.
            let found = at.get(value).and_then(|offsets| {
                offsets
                    .iter()
                    .find(|at| **at == *offset)
                    .or(offsets.first())
                    .copied()
            });
            if found != Some(*offset) {
                lost.insert((*value).to_owned());
                violations.push(Violation::Lost {
                    value: (*value).to_owned(),
                    offset: *offset,
                    node: node.clone(),
                    found_at: found,
                });
            }
        }
    }

    let divergent = divergence(state, &mut violations);
    let stale_reads = stale_reads(history, &mut violations);
    Verdict {
        counts: Counts {
            operations: history.ops.len(),
            acknowledged: acked.len(),
            lost: lost.len(),
            duplicated: duplicated.len(),
            divergent,
            stale_reads,
        },
        violations,
    }
}

/// Compares every node with the most common contents; returns how many differ.
fn divergence(state: &FinalState, violations: &mut Vec<Violation>) -> usize {
    let mut tally: BTreeMap<&Vec<(u64, String)>, usize> = BTreeMap::new();
    for records in state.nodes.values() {
        *tally.entry(records).or_default() += 1;
    }
    let Some((reference, _)) = tally.iter().max_by_key(|(_, count)| **count) else {
        return 0;
    };
    let mut divergent = 0;
    for (node, records) in &state.nodes {
        if records == *reference {
            continue;
        }
        divergent += 1;
        let at = records
            .iter()
            .zip(reference.iter())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| records.len().min(reference.len()));
        violations.push(Violation::Divergent {
            node: node.clone(),
            at: at as u64,
        });
    }
    divergent
}

/// Linearizable reads that missed an append acknowledged before they began.
fn stale_reads(history: &History, violations: &mut Vec<Violation>) -> usize {
    let acked: Vec<(u64, &str)> = history
        .ops
        .iter()
        .filter_map(|op| match (&op.kind, op.outcome) {
            (OpKind::Append { value }, Outcome::Ok { .. }) => {
                Some((op.completed_ms, value.as_str()))
            }
            _ => None,
        })
        .collect();
    let mut stale = 0;
    for op in &history.ops {
        let (OpKind::LinearizableRead { values }, Outcome::Ok { .. }) = (&op.kind, op.outcome)
        else {
            continue;
        };
        let seen: BTreeSet<&str> = values.iter().map(String::as_str).collect();
        let missed: Vec<&str> = acked
            .iter()
            .filter(|(completed, value)| *completed < op.invoked_ms && !seen.contains(value))
            .map(|(_, value)| *value)
            .collect();
        if let Some(first) = missed.first() {
            stale += 1;
            violations.push(Violation::StaleRead {
                process: op.process,
                invoked_ms: op.invoked_ms,
                missed: (*first).to_owned(),
            });
        }
    }
    stale
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Op;

    fn append(process: u64, value: &str, at: (u64, u64), outcome: Outcome) -> Op {
        Op {
            process,
            kind: OpKind::Append {
                value: value.into(),
            },
            invoked_ms: at.0,
            completed_ms: at.1,
            outcome,
        }
    }

    fn ok(offset: u64) -> Outcome {
        Outcome::Ok {
            offset: Some(offset),
        }
    }

    fn read(process: u64, values: &[&str], at: (u64, u64)) -> Op {
        Op {
            process,
            kind: OpKind::LinearizableRead {
                values: values.iter().map(|v| (*v).to_owned()).collect(),
            },
            invoked_ms: at.0,
            completed_ms: at.1,
            outcome: Outcome::Ok { offset: None },
        }
    }

    fn records(values: &[&str]) -> Vec<(u64, String)> {
        (0u64..)
            .zip(values.iter().map(|v| (*v).to_owned()))
            .collect()
    }

    fn three(values: &[&str]) -> FinalState {
        FinalState {
            nodes: ["n1", "n2", "n3"]
                .into_iter()
                .map(|n| (n.to_owned(), records(values)))
                .collect(),
        }
    }

    /// a and b acknowledged, c unknown (and in fact written), d refused.
    fn history() -> History {
        History {
            ops: vec![
                append(1, "a", (0, 10), ok(0)),
                append(2, "b", (5, 20), ok(1)),
                append(1, "c", (11, 40), Outcome::Unknown),
                append(2, "d", (21, 30), Outcome::Fail),
                read(3, &["a", "b"], (25, 35)),
            ],
        }
    }

    #[test]
    fn a_clean_run_should_pass() {
        let verdict = check(&history(), &three(&["a", "b", "c"]));
        assert!(verdict.passed(), "{:?}", verdict.violations);
        assert_eq!(
            verdict.counts,
            Counts {
                operations: 5,
                acknowledged: 2,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn a_lost_acknowledgement_should_fail() {
        let mut state = three(&["a", "b"]);
        state.nodes.insert("n3".into(), records(&["a"]));
        let verdict = check(&history(), &state);
        assert_eq!(verdict.counts.lost, 1);
        assert!(verdict.violations.contains(&Violation::Lost {
            value: "b".into(),
            offset: 1,
            node: "n3".into(),
            found_at: None,
        }));
        // An acknowledged append at another offset than acknowledged is lost too.
        let verdict = check(&history(), &three(&["b", "a"]));
        assert_eq!(verdict.counts.lost, 2);
    }

    /// A plain producer's retry stores a value again and is acknowledged at the
    /// second offset: a duplicate, but not a loss.
    #[test]
    fn a_value_acknowledged_at_its_second_copy_should_be_a_duplicate_not_a_loss() {
        let history = History {
            ops: vec![
                append(1, "a", (0, 10), ok(0)),
                append(2, "b", (5, 60), ok(2)),
            ],
        };
        let verdict = check(&history, &three(&["a", "b", "b"]));
        assert_eq!(verdict.counts.duplicated, 1, "{:?}", verdict.violations);
        assert_eq!(verdict.counts.lost, 0, "{:?}", verdict.violations);
    }

    #[test]
    fn a_duplicate_should_fail() {
        let verdict = check(&history(), &three(&["a", "b", "c", "c"]));
        assert_eq!(verdict.counts.duplicated, 1);
        assert!(matches!(
            &verdict.violations[..],
            [Violation::Duplicated { value, offsets, .. }, ..] if value == "c" && offsets == &[2, 3]
        ));
    }

    #[test]
    fn a_stale_read_should_fail() {
        let mut history = history();
        // Began after b was acknowledged (at 20), yet does not see it.
        history.ops.push(read(4, &["a"], (21, 22)));
        let verdict = check(&history, &three(&["a", "b"]));
        assert_eq!(verdict.counts.stale_reads, 1);
        assert!(verdict.violations.contains(&Violation::StaleRead {
            process: 4,
            invoked_ms: 21,
            missed: "b".into(),
        }));
        // A read that began before the acknowledgement may miss it.
        let mut history = self::history();
        history.ops.push(read(4, &["a"], (15, 22)));
        assert!(check(&history, &three(&["a", "b"])).passed());
    }

    #[test]
    fn divergent_replicas_should_fail() {
        let mut state = three(&["a", "b", "c"]);
        state.nodes.insert("n2".into(), records(&["a", "b", "d"]));
        let verdict = check(&history(), &state);
        assert_eq!(verdict.counts.divergent, 1);
        assert!(verdict.violations.contains(&Violation::Divergent {
            node: "n2".into(),
            at: 2
        }));
        // A node that is only shorter diverges where it ends.
        let mut state = three(&["a", "b", "c"]);
        state.nodes.insert("n1".into(), records(&["a", "b"]));
        let verdict = check(&history(), &state);
        assert!(verdict.violations.contains(&Violation::Divergent {
            node: "n1".into(),
            at: 2
        }));
    }

    #[test]
    fn gaps_and_values_never_sent_should_fail() {
        let mut state = three(&["a", "b"]);
        state.nodes.insert(
            "n1".into(),
            vec![(0, "a".into()), (1, "b".into()), (3, "x".into())],
        );
        let verdict = check(&history(), &state);
        assert!(verdict.violations.contains(&Violation::Gap {
            node: "n1".into(),
            expected: 2,
            found: 3
        }));
        assert!(verdict.violations.contains(&Violation::Phantom {
            value: "x".into(),
            node: "n1".into()
        }));
    }

    #[test]
    fn histories_should_survive_their_file_format() {
        let history = history();
        let mut bytes = Vec::new();
        history.write_jsonl(&mut bytes).unwrap();
        let back = History::read_jsonl(bytes.as_slice()).unwrap();
        assert_eq!(back, history);
        let err = History::read_jsonl("{\"process\":1}\n".as_bytes()).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
