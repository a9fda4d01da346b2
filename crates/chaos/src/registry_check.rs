//! The registry's checker: each instance is a register (present or absent) that one
//! client writes, one operation at a time, so its value at any moment is the effect
//! of its last acknowledged operation, unless an operation whose outcome is unknown
//! (which may take effect at any time after it was invoked) or one still in flight
//! makes it uncertain. Against that model:
//! - every node lists, once healed, exactly the instances whose last operation says
//!   they are there (none lost, none back from a deregistration);
//! - every node lists the same instances;
//! - a `?consistent` lookup sees every instance as its last operation completed
//!   before the lookup began left it.

use std::collections::{BTreeMap, BTreeSet};

use crate::checker::{Counts, Verdict, Violation};
use crate::history::{History, Op, OpKind, Outcome, RegistryState};

/// An operation's effect on an instance: present or not.
fn effect(op: &Op) -> Option<(String, bool)> {
    match &op.kind {
        OpKind::Register { service, instance } => Some((format!("{service}/{instance}"), true)),
        OpKind::Deregister { service, instance } => Some((format!("{service}/{instance}"), false)),
        _ => None,
    }
}

/// The writes to each instance, in the order invoked (refused ones left out: they
/// did not happen).
fn writes(history: &History) -> BTreeMap<String, Vec<(&Op, bool)>> {
    let mut by_instance: BTreeMap<String, Vec<(&Op, bool)>> = BTreeMap::new();
    for op in &history.ops {
        if op.outcome == Outcome::Fail {
            continue;
        }
        if let Some((key, present)) = effect(op) {
            by_instance.entry(key).or_default().push((op, present));
        }
    }
    for ops in by_instance.values_mut() {
        ops.sort_by_key(|(op, _)| op.invoked_ms);
    }
    by_instance
}

/// What an instance must be at the end: `None` when an unknown outcome leaves it
/// open.
fn final_expectation(ops: &[(&Op, bool)]) -> Option<bool> {
    let (last, present) = ops.last()?;
    if last.outcome == Outcome::Unknown {
        return None;
    }
    // An unknown write may take effect after the last one.
    let open = ops
        .iter()
        .any(|(op, effect)| op.outcome == Outcome::Unknown && effect != present);
    (!open).then_some(*present)
}

/// What a lookup invoked at `start` and completed at `end` must show of an
/// instance: `None` when a write in flight (or unknown) leaves it open.
fn expected_at(ops: &[(&Op, bool)], start: u64, end: u64) -> Option<bool> {
    let mut before = false;
    for (op, present) in ops {
        match op.outcome {
            Outcome::Ok { .. } if op.completed_ms < start => before = *present,
            // Invoked before the lookup ended, completed after it began: concurrent.
            Outcome::Ok { .. } | Outcome::Unknown if op.invoked_ms <= end && *present != before => {
                return None;
            }
            _ => {}
        }
    }
    Some(before)
}

/// Judges a registry run: its history and what each node listed once healed.
pub fn check_registry(history: &History, state: &RegistryState) -> Verdict {
    let mut violations = Vec::new();
    let writes = writes(history);
    let acknowledged = history
        .ops
        .iter()
        .filter(|op| effect(op).is_some() && matches!(op.outcome, Outcome::Ok { .. }))
        .count();

    let mut lost = BTreeSet::new();
    for (node, listed) in &state.nodes {
        for (key, ops) in &writes {
            match (final_expectation(ops), listed.contains(key)) {
                (Some(true), false) => {
                    lost.insert(key.clone());
                    violations.push(Violation::LostRegistration {
                        instance: key.clone(),
                        node: node.clone(),
                    });
                }
                (Some(false), true) => {
                    lost.insert(key.clone());
                    violations.push(Violation::Resurrected {
                        instance: key.clone(),
                        node: node.clone(),
                    });
                }
                _ => {}
            }
        }
        let written: BTreeSet<&String> = writes.keys().collect();
        for key in listed.iter().filter(|key| !written.contains(key)) {
            violations.push(Violation::Phantom {
                value: key.clone(),
                node: node.clone(),
            });
        }
    }

    // Replicas: compared with the first node's list.
    let mut divergent = 0;
    if let Some((_, first)) = state.nodes.iter().next() {
        for (node, listed) in state.nodes.iter().skip(1) {
            let differences = listed.symmetric_difference(first).count();
            if differences > 0 {
                divergent += 1;
                violations.push(Violation::DivergentTable {
                    node: node.clone(),
                    differences,
                });
            }
        }
    }

    let mut stale_reads = 0;
    for op in &history.ops {
        let (OpKind::Lookup { service, instances }, Outcome::Ok { .. }) = (&op.kind, op.outcome)
        else {
            continue;
        };
        let seen: BTreeSet<&String> = instances.iter().collect();
        let prefix = format!("{service}/");
        for (key, ops) in writes.range(prefix.clone()..) {
            let Some(instance) = key.strip_prefix(&prefix) else {
                break;
            };
            let Some(expected) = expected_at(ops, op.invoked_ms, op.completed_ms) else {
                continue;
            };
            if expected != seen.contains(&instance.to_owned()) {
                stale_reads += 1;
                violations.push(Violation::StaleLookup {
                    process: op.process,
                    invoked_ms: op.invoked_ms,
                    instance: key.clone(),
                    expected_present: expected,
                });
            }
        }
    }

    Verdict {
        counts: Counts {
            operations: history.ops.len(),
            acknowledged,
            lost: lost.len(),
            duplicated: 0,
            divergent,
            stale_reads,
        },
        violations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(process: u64, kind: OpKind, invoked_ms: u64, completed_ms: u64, outcome: Outcome) -> Op {
        Op {
            process,
            kind,
            invoked_ms,
            completed_ms,
            outcome,
        }
    }

    fn register(instance: &str) -> OpKind {
        OpKind::Register {
            service: "svc".into(),
            instance: instance.into(),
        }
    }

    fn deregister(instance: &str) -> OpKind {
        OpKind::Deregister {
            service: "svc".into(),
            instance: instance.into(),
        }
    }

    fn lookup(found: &[&str]) -> OpKind {
        OpKind::Lookup {
            service: "svc".into(),
            instances: found.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    const OK: Outcome = Outcome::Ok { offset: None };

    fn state(nodes: &[&[&str]]) -> RegistryState {
        RegistryState {
            nodes: (1..)
                .zip(nodes)
                .map(|(n, keys)| {
                    (
                        format!("node{n}"),
                        keys.iter().map(|k| format!("svc/{k}")).collect(),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_clean_history_should_pass() {
        let history = History {
            ops: vec![
                op(1, register("a"), 0, 10, OK),
                op(2, register("b"), 0, 10, OK),
                op(3, lookup(&["a", "b"]), 20, 30, OK),
                op(2, deregister("b"), 40, 50, OK),
                op(3, lookup(&["a"]), 60, 70, OK),
            ],
        };
        let verdict = check_registry(&history, &state(&[&["a"], &["a"], &["a"]]));
        assert!(verdict.passed(), "{:?}", verdict.violations);
        assert_eq!(verdict.counts.acknowledged, 3);
    }

    #[test]
    fn a_lost_registration_should_fail() {
        let history = History {
            ops: vec![op(1, register("a"), 0, 10, OK)],
        };
        let verdict = check_registry(&history, &state(&[&["a"], &[], &["a"]]));
        assert!(
            matches!(
                verdict.violations.as_slice(),
                [Violation::LostRegistration { node, .. }, Violation::DivergentTable { .. }] if node == "node2"
            ),
            "{:?}",
            verdict.violations
        );
        assert_eq!(verdict.counts.lost, 1);
    }

    #[test]
    fn an_instance_back_from_its_deregistration_should_fail() {
        let history = History {
            ops: vec![
                op(1, register("a"), 0, 10, OK),
                op(1, deregister("a"), 20, 30, OK),
            ],
        };
        let verdict = check_registry(&history, &state(&[&["a"], &["a"], &["a"]]));
        assert_eq!(verdict.counts.lost, 1, "{:?}", verdict.violations);
        assert!(matches!(
            verdict.violations[0],
            Violation::Resurrected { .. }
        ));
    }

    #[test]
    fn a_stale_lookup_should_fail_but_a_concurrent_one_pass() {
        let history = History {
            ops: vec![
                op(1, register("a"), 0, 10, OK),
                // Began after the registration was acknowledged: must see it.
                op(3, lookup(&[]), 20, 30, OK),
                // Concurrent with the deregistration: either answer is right.
                op(1, deregister("a"), 40, 60, OK),
                op(3, lookup(&["a"]), 45, 50, OK),
                // After it: must not see it.
                op(3, lookup(&["a"]), 70, 80, OK),
            ],
        };
        let verdict = check_registry(&history, &state(&[&[], &[], &[]]));
        assert_eq!(verdict.counts.stale_reads, 2, "{:?}", verdict.violations);
        let at: Vec<u64> = verdict
            .violations
            .iter()
            .filter_map(|v| match v {
                Violation::StaleLookup { invoked_ms, .. } => Some(*invoked_ms),
                _ => None,
            })
            .collect();
        assert_eq!(at, [20, 70]);
    }

    #[test]
    fn an_unknown_write_should_leave_the_instance_open() {
        let history = History {
            ops: vec![
                op(1, register("a"), 0, 10, OK),
                op(1, deregister("a"), 20, 500, Outcome::Unknown),
                op(3, lookup(&["a"]), 600, 610, OK),
            ],
        };
        // Present or absent, on any node: the deregistration may or may not happen.
        let verdict = check_registry(&history, &state(&[&["a"], &["a"], &["a"]]));
        assert!(verdict.passed(), "{:?}", verdict.violations);
        let verdict = check_registry(&history, &state(&[&[], &[], &[]]));
        assert!(verdict.passed(), "{:?}", verdict.violations);
    }

    #[test]
    fn an_instance_nobody_registered_should_fail() {
        let verdict = check_registry(&History::default(), &state(&[&["x"], &["x"], &["x"]]));
        assert_eq!(verdict.violations.len(), 3);
        assert!(matches!(verdict.violations[0], Violation::Phantom { .. }));
    }
}
