//! `keel chaos run`: a bounded schedule of every process fault against a real
//! cluster of this binary, judged by the checker.

use std::process::Command;

use crate::support::KEEL;

#[test]
fn issue_18_every_process_fault_should_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(KEEL)
        .args([
            "chaos",
            "run",
            "--nemesis",
            "all",
            "--time-limit",
            "2s",
            "--clients",
            "3",
        ])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "keel chaos run failed: {stdout}");
    for fault in [
        "kill-leader",
        "kill-random",
        "kill-majority",
        "pause-leader",
    ] {
        assert!(stdout.contains(fault), "{fault} did not run: {stdout}");
    }
    assert!(stdout.contains("PASSED"), "{stdout}");
    // The run's files: the history, the final state, the verdict.
    let run = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| {
            path.is_dir()
                && path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("run-")
        })
        .expect("a run directory");
    let verdict: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("verdict.json")).unwrap()).unwrap();
    assert!(
        verdict["verdict"]["violations"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        verdict["verdict"]["counts"]["acknowledged"]
            .as_u64()
            .unwrap()
            > 0
    );
    let history = std::fs::read_to_string(run.join("history.jsonl")).unwrap();
    assert!(history.lines().count() > 10);
}
