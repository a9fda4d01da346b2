//! The HTTP/JSON API: the original contract (`POST /`, `GET /`), the log sink
//! (`POST /log`), and the topic routes under `/v1`. `docs/api/log.md` documents
//! every route.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::StreamExt;
use keel_commitlog::{Offset, Record};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use keel_serve::http::{ErrorBody, discard_body, read_body};
use keel_serve::openapi::Routes;

use crate::error::{LogServiceError, json_error};
use crate::metrics::{ServiceFigures, render_metrics};
use crate::tail::{TailSpec, spawn_tail};
use crate::topics::Topics;
use axum::Extension;
use keel_auth::{Action, Authorizer, Resource};
use keel_serve::tls::PeerPrincipal;

/// A verified client certificate's principal, when the connection has one.
type Peer = Option<Extension<PeerPrincipal>>;

/// Records `GET /v1/topics/{topic}/records` returns when `max` is not given, and at most.
const DEFAULT_RANGE_RECORDS: u64 = 100;
const MAX_RANGE_RECORDS: u64 = 10_000;
/// The largest value a tail event or a listed record also carries as `text`.
const LISTED_TEXT_MAX: usize = 64 * 1024;

#[derive(Clone)]
struct AppState {
    topics: Arc<Topics>,
    shutdown: CancellationToken,
    auth: Arc<Authorizer>,
}

impl AppState {
    /// Refused unless the caller may do `action` to `topic` (the default topic
    /// when empty).
    fn allow(
        &self,
        (headers, peer): (&HeaderMap, &Peer),
        action: Action,
        topic: &str,
    ) -> Result<(), LogServiceError> {
        let topic = match topic {
            "" => self.topics.config().default_topic.as_str(),
            topic => topic,
        };
        let peer = peer.as_ref().map(|Extension(peer)| peer);
        self.auth
            .check(headers, peer, action, Resource::Topic(topic))?;
        Ok(())
    }

    /// [`Self::allow`] for a route with a body: a refused request's body is read
    /// (a little of it) before the refusal goes out; see [`discard_body`].
    async fn allow_with_body(
        &self,
        who: (&HeaderMap, &Peer),
        action: Action,
        topic: &str,
        body: Body,
    ) -> Result<Body, LogServiceError> {
        match self.allow(who, action, topic) {
            Ok(()) => Ok(body),
            Err(err) => {
                discard_body(body).await;
                Err(err)
            }
        }
    }
}

/// The HTTP routes.
pub(crate) fn router(
    topics: Arc<Topics>,
    shutdown: CancellationToken,
    auth: Arc<Authorizer>,
) -> Router {
    routes()
        .into_router()
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(AppState {
            topics,
            shutdown,
            auth,
        })
}

/// The OpenAPI document of these routes, served at `/openapi.json`.
pub(crate) const OPENAPI: &str = include_str!("../../../docs/api/log.openapi.json");

/// Every HTTP route (the OpenAPI document's paths, as a test checks).
fn routes() -> Routes<AppState> {
    Routes::new(OPENAPI)
        .route("/", post(produce_original).get(consume_original))
        .route("/log", post(log_sink))
        .route("/v1/topics", get(list_topics))
        .route(
            "/v1/topics/{topic}/records",
            post(produce_records).get(read_range),
        )
        .route("/v1/topics/{topic}/records/{offset}", get(read_one))
        .route("/v1/topics/{topic}/tail", get(tail_sse))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// Answers an unknown route: JSON 404 for HTTP, `UNIMPLEMENTED` for gRPC.
pub(crate) async fn fallback(headers: HeaderMap) -> Response {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented("no such gRPC method").into_http::<Body>();
    }
    json_error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see docs/api/log.md",
    )
}

async fn method_not_allowed() -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see docs/api/log.md",
    )
}

/// Parses a JSON body, which must be an object (as every body of this API is).
fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, LogServiceError> {
    serde_json::from_slice::<Object<T>>(body)
        .map(|Object(value)| value)
        .map_err(|err| LogServiceError::BadRequest(format!("malformed JSON: {err}")))
}

/// A value read from a JSON object only. serde would also read a struct from an array
/// of its fields in order (`[0]` as `{"offset":0}`), which no client of this API
/// means.
#[derive(Debug)]
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        deserializer.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

/// Standard base64 read as Go reads it: the bits past the last byte of a value need
/// not be zero (`z+==` decodes as `z/==` does).
const BASE64_LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

fn decode_value(text: &str) -> Result<Bytes, LogServiceError> {
    BASE64_LENIENT.decode(text).map(Bytes::from).map_err(|err| {
        LogServiceError::BadRequest(format!(
            "record value is not valid base64 ({err}); values are base64 as Go encodes []byte"
        ))
    })
}

/// A record in the original JSON shape: `{"value":"<base64>","offset":N}`.
#[derive(Debug, Deserialize)]
struct WireRecordIn {
    #[serde(default)]
    value: Option<String>,
}

/// A record as the HTTP API answers it: `value` in base64, `offset`, and (but in the
/// original API) `timestamp_ms` and `text`, the value as text when it is UTF-8. The
/// value is encoded as it is written out, with no copy of it on the side.
#[derive(Debug)]
struct WireRecordOut {
    value: Bytes,
    offset: Offset,
    timestamp_ms: Option<u64>,
    /// Whether to add `text` (when the value is UTF-8).
    text: bool,
}

impl WireRecordOut {
    fn original(record: &Record) -> Self {
        Self {
            value: record.value.clone(),
            offset: record.offset,
            timestamp_ms: None,
            text: false,
        }
    }

    /// As [`WireRecordOut::full`], with `text` only for values up to
    /// [`LISTED_TEXT_MAX`]: a tail event or a listing is held in memory whole until
    /// its connection takes it, and nobody reads a megabyte line off a listing.
    fn listed(record: &Record) -> Self {
        Self {
            text: record.value.len() <= LISTED_TEXT_MAX,
            ..Self::full(record)
        }
    }

    fn full(record: &Record) -> Self {
        Self {
            value: record.value.clone(),
            offset: record.offset,
            timestamp_ms: Some(record.timestamp_ms),
            text: true,
        }
    }

    /// About how many bytes of JSON the record takes.
    fn json_len(&self) -> usize {
        self.value.len() * 4 / 3
            + if self.text {
                self.value.len() * 9 / 8
            } else {
                0
            }
            + 96
    }
}

impl Serialize for WireRecordOut {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("value", &Base64Out(&self.value))?;
        map.serialize_entry("offset", &self.offset)?;
        if let Some(timestamp_ms) = self.timestamp_ms {
            map.serialize_entry("timestamp_ms", &timestamp_ms)?;
        }
        if self.text
            && let Ok(text) = std::str::from_utf8(&self.value)
        {
            map.serialize_entry("text", text)?;
        }
        map.end()
    }
}

/// Bytes serialized as a base64 string, encoded straight into the output.
struct Base64Out<'a>(&'a [u8]);

impl Serialize for Base64Out<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&base64::display::Base64Display::new(self.0, &BASE64))
    }
}

#[derive(Debug, Deserialize)]
struct ProduceOriginal {
    record: Object<WireRecordIn>,
}

#[derive(Debug, Deserialize)]
struct ConsumeOriginal {
    #[serde(deserialize_with = "whole_number")]
    offset: Offset,
}

/// An offset in a JSON body: a whole number, also when written with a fraction of
/// zero (`160.0`, as JSON allows and some encoders write).
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Offset, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    if let Some(whole) = number.as_u64() {
        return Ok(whole);
    }
    match number.as_f64() {
        // A whole f64 below 2^64 is exactly the integer it names.
        Some(float)
            if float.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&float) =>
        {
            Ok(float as Offset)
        }
        _ => Err(serde::de::Error::custom(format!(
            "offset must be a whole number from 0 to 2^64 - 1, got {number}"
        ))),
    }
}

/// `POST /`: `{"record":{"value":"<base64>"}}` -> `{"offset":N}` (default topic).
async fn produce_original(
    State(state): State<AppState>,
    headers: HeaderMap,
    peer: Peer,
    body: Body,
) -> Result<Response, LogServiceError> {
    let body = state
        .allow_with_body((&headers, &peer), Action::Produce, "", body)
        .await?;
    let body = read_body(body, state.topics.config().max_body_bytes).await?;
    let request: ProduceOriginal = parse_json(&body)?;
    let value = decode_value(request.record.0.value.as_deref().unwrap_or(""))?;
    let offsets = state.topics.append("", vec![value], None).await?;
    Ok(axum::Json(serde_json::json!({ "offset": offsets.start })).into_response())
}

/// `GET /` with `{"offset":N}` -> `{"record":{"value":"<base64>","offset":N}}`.
async fn consume_original(
    State(state): State<AppState>,
    headers: HeaderMap,
    peer: Peer,
    body: Body,
) -> Result<Response, LogServiceError> {
    let body = state
        .allow_with_body((&headers, &peer), Action::Consume, "", body)
        .await?;
    let body = read_body(body, state.topics.config().max_body_bytes).await?;
    let request: ConsumeOriginal = parse_json(&body)?;
    let record = state.topics.get("")?.read(request.offset).await?;
    Ok(
        axum::Json(serde_json::json!({ "record": WireRecordOut::original(&record) }))
            .into_response(),
    )
}

/// `POST /log`: a text line for the log-sink topic.
async fn log_sink(
    State(state): State<AppState>,
    headers: HeaderMap,
    peer: Peer,
    body: Body,
) -> Result<Response, LogServiceError> {
    let sink = state.topics.config().log_sink_topic.clone();
    let body = state
        .allow_with_body((&headers, &peer), Action::Produce, &sink, body)
        .await?;
    let body = read_body(body, state.topics.config().max_body_bytes).await?;
    let mut line = &body[..];
    while let [rest @ .., b'\n' | b'\r'] = line {
        line = rest;
    }
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(LogServiceError::BadRequest(
            "empty log line: send the line as the request body".into(),
        ));
    }
    let value = body.slice_ref(line);
    let sink = state.topics.config().log_sink_topic.clone();
    let offsets = state.topics.append(&sink, vec![value], None).await?;
    Ok(axum::Json(serde_json::json!({ "offset": offsets.start })).into_response())
}

/// The header naming an idempotent producer (a non-zero integer).
pub(crate) const PRODUCER_HEADER: &str = "keel-producer";
/// The header with the producer's sequence number of the append.
pub(crate) const SEQUENCE_HEADER: &str = "keel-sequence";

/// The producer tag of a request: both headers or neither.
fn producer_tag(
    headers: &HeaderMap,
) -> Result<Option<crate::replica::ProducerSeq>, LogServiceError> {
    let number = |name: &str| -> Result<Option<u64>, LogServiceError> {
        headers
            .get(name)
            .map(|value| {
                value
                    .to_str()
                    .ok()
                    .and_then(|text| text.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        LogServiceError::BadRequest(format!(
                            "header {name} is not an unsigned integer"
                        ))
                    })
            })
            .transpose()
    };
    match (number(PRODUCER_HEADER)?, number(SEQUENCE_HEADER)?) {
        (None, None) => Ok(None),
        (Some(0), _) => Err(LogServiceError::BadRequest(format!(
            "header {PRODUCER_HEADER} must not be 0"
        ))),
        (Some(producer), Some(sequence)) => {
            Ok(Some(crate::replica::ProducerSeq { producer, sequence }))
        }
        _ => Err(LogServiceError::BadRequest(format!(
            "headers {PRODUCER_HEADER} and {SEQUENCE_HEADER} go together"
        ))),
    }
}

/// A JSON produce body: `{"records":[...]}`, or one record (`{"value":...}`).
#[derive(Debug, Deserialize)]
struct ProduceJson {
    #[serde(default)]
    records: Option<Vec<Object<WireRecordIn>>>,
    #[serde(default)]
    value: Option<String>,
}

/// `POST /v1/topics/{topic}/records`: JSON (`{"value":..}` or `{"records":[..]}`) or
/// raw bytes (any other content type) as one record.
async fn produce_records(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    peer: Peer,
    body: Body,
) -> Result<Response, LogServiceError> {
    let body = state
        .allow_with_body((&headers, &peer), Action::Produce, &topic, body)
        .await?;
    let body = read_body(body, state.topics.config().max_body_bytes).await?;
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let values = if json {
        let records = match parse_json::<ProduceJson>(&body)? {
            ProduceJson {
                records: Some(records),
                ..
            } => records.into_iter().map(|Object(record)| record).collect(),
            ProduceJson { value, .. } => vec![WireRecordIn { value }],
        };
        records
            .iter()
            .map(|record| decode_value(record.value.as_deref().unwrap_or("")))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![body]
    };
    if values.is_empty() {
        return Err(LogServiceError::BadRequest("no records to append".into()));
    }
    let tag = producer_tag(&headers)?;
    let offsets = state.topics.append(&topic, values, tag).await?;
    Ok(axum::Json(serde_json::json!({
        "first_offset": offsets.start,
        "count": offsets.end - offsets.start,
    }))
    .into_response())
}

fn parse_offset(name: &str, text: &str) -> Result<Offset, LogServiceError> {
    text.parse().map_err(|_| {
        LogServiceError::BadRequest(format!("{name} must be a whole number, got {text:?}"))
    })
}

/// `GET /v1/topics/{topic}/records/{offset}`.
async fn read_one(
    State(state): State<AppState>,
    headers: HeaderMap,
    peer: Peer,
    Path((topic, offset)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, LogServiceError> {
    state.allow((&headers, &peer), Action::Consume, &topic)?;
    let offset = parse_offset("offset", &offset)?;
    consistency(&state, &query).await?;
    let record = state.topics.get(&topic)?.read(offset).await?;
    Ok(axum::Json(serde_json::json!({ "record": WireRecordOut::full(&record) })).into_response())
}

/// Honours `?consistency=linearizable` (wait until this node has applied every
/// write acknowledged before the request); `?consistency=local`, the default,
/// reads what this node has applied.
async fn consistency(
    state: &AppState,
    query: &HashMap<String, String>,
) -> Result<(), LogServiceError> {
    match query.get("consistency").map(String::as_str) {
        None | Some("local") => Ok(()),
        Some("linearizable") => state.topics.read_barrier().await,
        Some(other) => Err(LogServiceError::BadRequest(format!(
            "consistency {other:?} is neither \"local\" nor \"linearizable\""
        ))),
    }
}

/// `GET /v1/topics/{topic}/records?from=N&max=M`.
async fn read_range(
    State(state): State<AppState>,
    headers: HeaderMap,
    peer: Peer,
    Path(topic): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, LogServiceError> {
    state.allow((&headers, &peer), Action::Consume, &topic)?;
    consistency(&state, &query).await?;
    let topic = state.topics.get(&topic)?;
    let from = query
        .get("from")
        .map(|v| parse_offset("from", v))
        .transpose()?
        .unwrap_or(0);
    let max = query
        .get("max")
        .map(|v| parse_offset("max", v))
        .transpose()?
        .unwrap_or(DEFAULT_RANGE_RECORDS)
        .min(MAX_RANGE_RECORDS);
    // One response holds at most `consume_max_bytes` of values (and always at least
    // one record): a client pages on with `next_offset`.
    let mut budget = state.topics.config().consume_max_bytes as usize;
    let mut records = Vec::new();
    let mut next = from;
    while (records.len() as u64) < max && budget > 0 {
        let chunk = topic.read_chunk(next, budget).await?;
        if chunk.is_empty() {
            break;
        }
        for record in chunk
            .into_iter()
            .take((max - records.len() as u64) as usize)
        {
            if !records.is_empty() && record.value.len() > budget {
                budget = 0;
                break;
            }
            budget = budget.saturating_sub(record.value.len());
            next = record.offset + 1;
            records.push(WireRecordOut::listed(&record));
        }
    }
    // Serialized straight from the records into a buffer of about the right size: no
    // JSON tree, nor a buffer grown by doubling, copies them once more.
    #[derive(Serialize)]
    struct Range {
        records: Vec<WireRecordOut>,
        next_offset: Offset,
    }
    let size: usize = records.iter().map(WireRecordOut::json_len).sum();
    let mut body = Vec::with_capacity(size + 64);
    serde_json::to_writer(
        &mut body,
        &Range {
            records,
            next_offset: next,
        },
    )
    .map_err(|err| LogServiceError::Serve(std::sync::Arc::new(std::io::Error::other(err))))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// `GET /v1/topics/{topic}/tail?from=N`: Server-Sent Events, one per record, from
/// `from` (default: the next offset, so only new records) on.
async fn tail_sse(
    State(state): State<AppState>,
    headers: HeaderMap,
    peer: Peer,
    Path(topic): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, LogServiceError> {
    state.allow((&headers, &peer), Action::Consume, &topic)?;
    let topic = state.topics.get(&topic)?;
    let from = match query.get("from") {
        Some(from) => parse_offset("from", from)?,
        None => topic.watch_next().borrow().to_owned(),
    };
    let spec = TailSpec {
        from,
        max_bytes: state.topics.config().consume_max_bytes as usize,
        follow: true,
    };
    // Each event is encoded only when the connection is ready to write it.
    let events = spawn_tail(
        topic,
        spec,
        state.shutdown.clone(),
        state.topics.read_ahead(),
    )
    .records()
    .map(|record| {
        Ok::<Event, Infallible>(match record {
            Ok(record) => {
                // Serialized into a buffer of its size (the event, held until the
                // connection takes it, copies it once, exactly).
                let out = WireRecordOut::listed(&record);
                let mut json = Vec::with_capacity(out.json_len());
                let encoded = serde_json::to_writer(&mut json, &out)
                    .map_err(|err| err.to_string())
                    .and_then(|()| String::from_utf8(json).map_err(|err| err.to_string()));
                match encoded {
                    Ok(data) => Event::default()
                        .event("record")
                        .id(record.offset.to_string())
                        .data(data),
                    Err(err) => Event::default().event("error").data(
                        ErrorBody::new("internal", &format!("encoding a record: {err}")).to_json(),
                    ),
                }
            }
            Err(err) => {
                let message = err.to_string();
                Event::default()
                    .event("error")
                    .data(ErrorBody::new(err.code(), &message).to_json())
            }
        })
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// `GET /v1/topics`.
async fn list_topics(State(state): State<AppState>, headers: HeaderMap, peer: Peer) -> Response {
    // The names and sizes of every topic: consume on a pattern that matches `*`.
    if let Err(err) = state.allow((&headers, &peer), Action::Consume, "*") {
        return err.into_response();
    }
    axum::Json(serde_json::json!({ "topics": state.topics.list() })).into_response()
}

/// `GET /healthz`: 200 while serving, 503 once shutdown has begun.
async fn healthz(State(state): State<AppState>) -> Response {
    if state.shutdown.is_cancelled() {
        return LogServiceError::ShuttingDown.into_response();
    }
    let unavailable: Vec<&str> = state.topics.unavailable().collect();
    let failed = state.topics.failed();
    if unavailable.is_empty() && failed.is_empty() {
        return axum::Json(serde_json::json!({ "status": "ok" })).into_response();
    }
    // Serving, so still 200: the other topics work. The listed ones need an operator.
    axum::Json(serde_json::json!({
        "status": "degraded",
        "unavailable_topics": unavailable,
        "failed_topics": failed,
    }))
    .into_response()
}

/// `GET /readyz`: 200 when the node serves current data: a single node always; a
/// cluster node once it knows a leader and has applied what was committed when it
/// started. 503 with the reason otherwise.
async fn readyz(State(state): State<AppState>) -> Response {
    if state.shutdown.is_cancelled() {
        return LogServiceError::ShuttingDown.into_response();
    }
    let ready = match state.topics.replication() {
        Some(replication) => replication.readiness.ready().await,
        None => Ok(()),
    };
    match ready {
        Err(reason) => json_error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", &reason),
        Ok(()) => axum::Json(serde_json::json!({ "status": "ready" })).into_response(),
    }
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(state): State<AppState>) -> Response {
    let service = ServiceFigures {
        unavailable_topics: state.topics.unavailable().count(),
        failed_topics: state.topics.failed().len(),
        read_ahead_bytes: state.topics.read_ahead().held(),
        append_latency: state.topics.append_latency(),
    };
    let mut out = render_metrics(&state.topics.metrics(), &service);
    if let Some(replication) = state.topics.replication() {
        keel_raft::render_metrics(replication.writer.raft(), &mut out);
    }
    state.auth.render(&mut out);
    out.response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_route_should_be_in_the_openapi_document_and_the_reverse() {
        keel_serve::openapi::path_drift(super::OPENAPI, super::routes().paths()).unwrap();
    }
}
