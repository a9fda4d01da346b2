//! The registry's workload: clients that register and deregister instances of a
//! few services, each client its own instances, one write at a time, with a
//! `?consistent` lookup after each write; and the reading of every node's table
//! once the faults are healed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::history::{Op, OpKind, Outcome, RegistryState};
use crate::runner::{ATTEMPT_TIMEOUT, Recorder, WRITE_PATIENCE};

/// The services the instances belong to.
const SERVICES: u64 = 3;
/// The instances each client owns.
const INSTANCES: u64 = 4;

#[derive(Deserialize)]
struct Instance {
    name: String,
    id: String,
}

#[derive(Deserialize)]
struct Table {
    instances: Vec<Instance>,
}

/// One client: registers and deregisters its own instances in turn, each write
/// retried on the next node (after [`ATTEMPT_TIMEOUT`] at most) until answered or
/// [`WRITE_PATIENCE`] runs out (both writes are idempotent), and looks a service up
/// linearizably after each.
pub(crate) async fn registrar(
    process: u64,
    addrs: Vec<String>,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) {
    let http = keel_serve::client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        .build()
        .unwrap_or_default();
    let mut present = [false; INSTANCES as usize];
    let mut next = process as usize;
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let k = round % INSTANCES;
        round += 1;
        let service = format!("svc{}", (process + k) % SERVICES);
        let instance = format!("p{process}-i{k}.chaos:80");
        let register = !present[k as usize];
        let invoked_ms = recorder.ms();
        let deadline = Instant::now() + WRITE_PATIENCE;
        let outcome = loop {
            next += 1;
            let addr = &addrs[next % addrs.len()];
            let request = if register {
                http.post(format!("http://{addr}/services"))
                    .json(&serde_json::json!({ "name": service, "addr": instance }))
            } else {
                http.delete(format!("http://{addr}/v1/services/{service}/{instance}"))
            };
            // Every attempt at one write carries the same key: one that arrives
            // late (held by a node cut off) is not applied again.
            let request = request.header("idempotency-key", format!("p{process}-w{round}"));
            match request.send().await.map(|r| r.status()) {
                Ok(status) if status.is_success() => break Outcome::Ok { offset: None },
                // Not registered (any more): the deregistration's effect holds.
                Ok(reqwest::StatusCode::NOT_FOUND) if !register => {
                    break Outcome::Ok { offset: None };
                }
                Ok(status) if status.is_client_error() => break Outcome::Fail,
                _ if Instant::now() >= deadline => break Outcome::Unknown,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        // After an unknown outcome either may hold; the next write settles it (both
        // writes are idempotent). A refused one changed nothing.
        if outcome != Outcome::Fail {
            present[k as usize] = register;
        }
        let kind = if register {
            OpKind::Register {
                service: service.clone(),
                instance,
            }
        } else {
            OpKind::Deregister {
                service: service.clone(),
                instance,
            }
        };
        recorder.push(Op {
            process,
            kind,
            invoked_ms,
            completed_ms: recorder.ms(),
            outcome,
        });

        next += 1;
        let lookup = format!(
            "http://{}/v1/services/{service}?consistent&all=true",
            addrs[next % addrs.len()]
        );
        let invoked_ms = recorder.ms();
        let found = async {
            let response = http.get(lookup).send().await.ok()?;
            let found: Vec<Instance> = response.error_for_status().ok()?.json().await.ok()?;
            Some(found.into_iter().map(|i| i.id).collect::<Vec<_>>())
        };
        if let Some(instances) = found.await {
            recorder.push(Op {
                process,
                kind: OpKind::Lookup { service, instances },
                invoked_ms,
                completed_ms: recorder.ms(),
                outcome: Outcome::Ok { offset: None },
            });
        }
    }
}

/// Every node's instances, read linearizably once healed.
pub(crate) async fn final_state(
    http: &reqwest::Client,
    nodes: &[(String, String)],
) -> RegistryState {
    let mut state = RegistryState::default();
    for (name, addr) in nodes {
        let url = format!("http://{addr}/v1/services?consistent");
        let table = async {
            let response = http.get(url).send().await.ok()?;
            response.error_for_status().ok()?.json::<Table>().await.ok()
        };
        let listed = table
            .await
            .map(|t| {
                t.instances
                    .into_iter()
                    .map(|i| format!("{}/{}", i.name, i.id))
                    .collect()
            })
            .unwrap_or_default();
        state.nodes.insert(name.clone(), listed);
    }
    state
}
