//! `keel chaos run`: a bounded schedule of every process and disk fault against
//! real log and registry clusters of this binary on 127.0.0.1, judged by the
//! checkers. (`.ci/run`
//! runs every fault, the network ones too, with each node in its own network
//! namespace.)

use std::process::Command;

use crate::support::KEEL;

#[test]
fn process_and_disk_faults_should_lose_nothing_in_the_log_or_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(KEEL)
        .args([
            "chaos",
            "run",
            "--nemesis",
            "all",
            "--network",
            "loopback",
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
    let faults = [
        "kill-leader",
        "kill-random",
        "kill-majority",
        "pause-leader",
        "torn-tail",
        "corrupt-sealed",
        "corrupt-active",
        "corrupt-raft-log",
        "corrupt-meta",
        "wipe-data",
    ];
    for fault in faults {
        assert!(
            stdout.contains(&format!("| log/{fault} |")),
            "{fault} did not run against the log: {stdout}"
        );
        // The registry has no topics to damage.
        let topic_fault = fault == "corrupt-sealed" || fault == "corrupt-active";
        assert_eq!(
            stdout.contains(&format!("| registry/{fault} |")),
            !topic_fault,
            "{fault} against the registry: {stdout}"
        );
    }
    assert!(
        stdout.contains("skipped (no namespaces): partition-leader"),
        "{stdout}"
    );
    assert!(stdout.contains("PASSED"), "{stdout}");
    // The runs' files: each fault's history, final state and verdict; the summary.
    let runs = std::fs::read_dir(dir.path())
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
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs.join("summary.json")).unwrap()).unwrap();
    assert_eq!(
        summary.as_object().unwrap().len(),
        2 * faults.len() - 2,
        "{summary}"
    );
    let run = runs.join("log").join("kill-leader");
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
