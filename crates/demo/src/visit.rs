//! The visit counter: `GET /` counts a visit and answers the count.
//!
//! The count is the length of the `visits` topic: each visit appends one record
//! and its offset plus one is the count. Every instance shares it, and it survives
//! restarts, because the log service keeps it. Each visit also logs `visit N` to
//! the log sink.

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::{DemoError, DiscoveredLog};

/// The topic whose length is the visit count.
pub const VISITS_TOPIC: &str = "visits";

#[derive(Clone)]
struct Visit {
    logs: DiscoveredLog,
    me: Arc<OnceLock<String>>,
}

/// The visit service's routes; `me` is set to the instance's address once bound.
pub fn router(logs: DiscoveredLog, me: Arc<OnceLock<String>>) -> Router {
    Router::new()
        .route("/", get(visit))
        .with_state(Visit { logs, me })
}

async fn visit(State(visit): State<Visit>) -> Result<Json<Value>, DemoError> {
    let offset = visit
        .logs
        .append(VISITS_TOPIC, Bytes::from_static(b"visit"))
        .await?;
    let count = offset + 1;
    visit.logs.line(format!("visit {count}"));
    let instance = visit.me.get().map_or("", String::as_str);
    Ok(Json(json!({"visits": count, "instance": instance})))
}
