//! The registry's HTTP/JSON API; `docs/api/registry.md` documents every route.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use futures::StreamExt;
use keel_serve::openapi::Routes;
use serde_json::json;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use keel_serve::http::{BodyError, ErrorBody, Prometheus};

use crate::checker::CheckStats;
use crate::config::RegistryConfig;
use crate::error::RegistryError;
use crate::registration::{Registration, parse_identity, validate_service_name};
use crate::registry::{Registry, now_ms};
use crate::state::{Claim, Command, Health};

use axum::Extension;
use keel_auth::{Action, Authorizer, Principal, Resource};
use keel_serve::tls::PeerPrincipal;

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) registry: Arc<Registry>,
    /// Shared, not copied: axum clones the state for every request.
    pub(crate) config: Arc<RegistryConfig>,
    pub(crate) checks: Arc<CheckStats>,
    /// Who may do what (everyone everything without an ACL).
    pub(crate) auth: Arc<Authorizer>,
    /// Cancelled when shutdown begins: watches answer at once and streams end, so
    /// they do not hold the graceful shutdown open.
    pub(crate) stopping: tokio_util::sync::CancellationToken,
}

/// The registry's routes; `extra` (a cluster node's Raft service) is served beside
/// them.
pub(crate) fn router(state: AppState, extra: Option<Router>) -> Router {
    let mut routes = routes().into_router().with_state(state);
    if let Some(extra) = extra {
        routes = routes.merge(extra);
    }
    routes
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                None,
                "no such route; see docs/api/registry.md",
            )
        })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                None,
                "this route does not take that method",
            )
        })
}

/// The OpenAPI document of these routes, served at `/openapi.json`.
pub(crate) const OPENAPI: &str = include_str!("../../../docs/api/registry.openapi.json");

/// Every HTTP route (the OpenAPI document's paths, as a test checks).
fn routes() -> Routes<AppState> {
    Routes::new(OPENAPI)
        .route("/services", post(register).delete(deregister))
        .route("/v1/services", get(list_all))
        .route("/v1/services/{name}", get(list_service))
        .route("/v1/services/{name}/{id}", delete(deregister_by_path))
        .route("/v1/services/{name}/{id}/heartbeat", put(heartbeat))
        .route("/v1/watch", get(watch))
        .route("/v1/watch/stream", get(watch_stream))
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

fn error(status: StatusCode, code: &str, field: Option<&str>, message: &str) -> Response {
    let body = ErrorBody::new(code, message);
    match field {
        Some(field) => body.field(field).response(status),
        None => body.response(status),
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        match &self {
            Self::BadRequest { field, .. } => error(
                StatusCode::BAD_REQUEST,
                self.code(),
                Some(field),
                &self.to_string(),
            ),
            Self::TargetNotAllowed { field, .. } => error(
                StatusCode::FORBIDDEN,
                self.code(),
                Some(field),
                &self.to_string(),
            ),
            Self::NotOwner { .. } => {
                error(StatusCode::FORBIDDEN, self.code(), None, &self.to_string())
            }
            Self::Denied(denied) => error(denied.status(), self.code(), None, &self.to_string()),
            Self::UnknownInstance { .. } => {
                error(StatusCode::NOT_FOUND, self.code(), None, &self.to_string())
            }
            Self::Full { .. } => error(
                StatusCode::INSUFFICIENT_STORAGE,
                self.code(),
                None,
                &self.to_string(),
            ),
            Self::Unavailable(_) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                self.code(),
                None,
                &self.to_string(),
            ),
            Self::InvalidConfig(_)
            | Self::Acl(_)
            | Self::HttpClient(_)
            | Self::Cluster(_)
            | Self::Internal(_) => {
                tracing::error!(error = %self, "internal error");
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    self.code(),
                    None,
                    &self.to_string(),
                )
            }
        }
    }
}

/// Reads a body up to the limit; a larger one is 413, a broken one 400, each blaming
/// the body.
async fn read_body(body: Body, max: u64) -> Result<Bytes, Response> {
    keel_serve::http::read_body(body, max)
        .await
        .map_err(|err| match err {
            BodyError::TooLarge { max, .. } => error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                Some("body"),
                &format!("request body is larger than the limit of {max} bytes"),
            ),
            other => error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                Some("body"),
                &other.to_string(),
            ),
        })
}

/// The `Idempotency-Key` of a write: retries of one write send the same key, and
/// the registry applies it once however late a copy arrives.
fn idempotency_key(
    headers: &axum::http::HeaderMap,
) -> std::result::Result<Option<String>, RegistryError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key)
            if !key.is_empty()
                && key.len() <= MAX_IDEMPOTENCY_KEY
                && key.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(key.to_owned()))
        }
        _ => Err(RegistryError::BadRequest {
            field: "Idempotency-Key",
            message: format!("must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        }),
    }
}

/// The longest `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 128;

/// `POST /services`: register; answers the available instances of each required service.
async fn register(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    peer: Peer,
    body: Body,
) -> Response {
    let request = match idempotency_key(&headers) {
        Ok(request) => request,
        Err(err) => return err.into_response(),
    };
    let body = match read_body(body, state.config.max_body_bytes).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let registration = match Registration::parse(&body) {
        Ok(registration) => registration,
        Err(err) => return err.into_response(),
    };
    let name = registration.name.clone();
    let principal = match allowed(
        &state,
        (&headers, &peer),
        Action::Register,
        Resource::Service(&name),
    ) {
        Ok(principal) => principal,
        Err(err) => return err.into_response(),
    };
    if let Err(err) = allowed_targets(&state, &principal, &registration).await {
        tracing::warn!(service = name, %principal, error = %err, "registration refused");
        return err.into_response();
    }
    let claim = match claim(&state, &principal, &name, true) {
        Ok(claim) => claim,
        Err(err) => return err.into_response(),
    };
    let url = registration.url.clone();
    match state
        .registry
        .register_as(registration, request, Some(claim))
        .await
    {
        Ok((answer, secret)) => {
            tracing::info!(service = name, url, %principal, "registered");
            let mut response = axum::Json(answer).into_response();
            if let Some(value) = secret.and_then(|secret| secret.parse().ok()) {
                response
                    .headers_mut()
                    .insert(keel_auth::signature::SECRET_HEADER, value);
            }
            response
        }
        Err(err) => err.into_response(),
    }
}

/// The caller, if the ACL lets it do `action` to `resource`; the refusal otherwise.
fn allowed(
    state: &AppState,
    (headers, peer): (&axum::http::HeaderMap, &Peer),
    action: Action,
    resource: Resource<'_>,
) -> Result<Principal, RegistryError> {
    let peer = peer.as_ref().map(|Extension(peer)| peer);
    Ok(state.auth.check(headers, peer, action, resource)?)
}

/// A verified client certificate's principal, when the connection has one.
type Peer = Option<Extension<PeerPrincipal>>;

/// What the state machine needs to judge `principal`'s change to an instance of
/// `service`, with a fresh secret for a registration (a new instance gets it).
fn claim(
    state: &AppState,
    principal: &Principal,
    service: &str,
    registers: bool,
) -> Result<Claim, RegistryError> {
    let secret = if registers {
        keel_auth::token::random_hex(32)
            .map_err(|_| RegistryError::Internal("the system's random source failed".into()))?
    } else {
        String::new()
    };
    Ok(Claim {
        principal: principal.name().to_owned(),
        admin: state.auth.is_admin_of(principal, service),
        secret,
    })
}

/// Checks every URL of `registration` against `--allow-targets`, if set, and
/// against the targets the ACL gives `principal` for the service, if any.
async fn allowed_targets(
    state: &AppState,
    principal: &Principal,
    registration: &Registration,
) -> Result<(), RegistryError> {
    let principal_targets = state.auth.register_targets(principal, &registration.name);
    let lists = [
        (
            state.config.allow_targets.as_ref(),
            "--allow-targets".to_owned(),
        ),
        (
            principal_targets.as_ref(),
            format!("the ACL's targets for {principal}"),
        ),
    ];
    let urls = [
        ("addr", Some(&registration.url)),
        ("update_url", registration.update_url.as_ref()),
        ("heartbeat_url", registration.heartbeat_url.as_ref()),
    ];
    for (targets, source) in &lists {
        let Some(targets) = targets else { continue };
        for (field, url) in urls {
            if let Some(url) = url {
                targets.check_url(url).await.map_err(|refused| {
                    RegistryError::TargetNotAllowed {
                        field,
                        message: format!("{refused} ({source})"),
                    }
                })?;
            }
        }
    }
    Ok(())
}

/// `DELETE /services` with the registration body (name and address are enough).
async fn deregister(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    peer: Peer,
    body: Body,
) -> Response {
    let body = match read_body(body, state.config.max_body_bytes).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    match parse_identity(&body) {
        Ok((name, id)) => remove(&state, (&headers, &peer), name, id).await,
        Err(err) => err.into_response(),
    }
}

async fn deregister_by_path(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    peer: Peer,
    Path((name, id)): Path<(String, String)>,
) -> Response {
    remove(&state, (&headers, &peer), name, id).await
}

async fn remove(
    state: &AppState,
    (headers, peer): (&axum::http::HeaderMap, &Peer),
    name: String,
    id: String,
) -> Response {
    // A name no instance can have is refused as such, before any retried write's
    // answer could be given for it.
    let name = match validate_service_name(name, "name") {
        Ok(name) => name,
        Err(err) => return err.into_response(),
    };
    let request = match idempotency_key(headers) {
        Ok(request) => request,
        Err(err) => return err.into_response(),
    };
    let claim = allowed(
        state,
        (headers, peer),
        Action::Deregister,
        Resource::Service(&name),
    )
    .and_then(|principal| claim(state, &principal, &name, false));
    let claim = match claim {
        Ok(claim) => claim,
        Err(err) => return err.into_response(),
    };
    let command = Command::Deregister {
        name: name.clone(),
        id: id.clone(),
    };
    match state
        .registry
        .execute_as(command, request, Some(claim))
        .await
    {
        Ok(_) => {
            tracing::info!(service = name, instance = id, "deregistered");
            axum::Json(json!({"deregistered": {"name": name, "id": id}})).into_response()
        }
        Err(err) => err.into_response(),
    }
}

/// `PUT /v1/services/{name}/{id}/heartbeat`: a TTL heartbeat.
async fn heartbeat(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    peer: Peer,
    Path((name, id)): Path<(String, String)>,
) -> Response {
    // Keeping an instance alive is its registrant's to do.
    let claim = allowed(
        &state,
        (&headers, &peer),
        Action::Register,
        Resource::Service(&name),
    )
    .and_then(|principal| claim(&state, &principal, &name, false));
    let claim = match claim {
        Ok(claim) => claim,
        Err(err) => return err.into_response(),
    };
    let command = Command::Heartbeat {
        name,
        id,
        at_ms: now_ms(),
    };
    match state.registry.execute_as(command, None, Some(claim)).await {
        Ok(_) => axum::Json(json!({"health": Health::Passing})).into_response(),
        Err(err) => err.into_response(),
    }
}

/// `GET /readyz`: 200 when the registry serves: always for a single one; for a
/// cluster node, once it knows a leader and has applied what was committed when it
/// started. 503 with the reason otherwise.
async fn readyz(State(state): State<AppState>) -> Response {
    let ready = match state.registry.replication() {
        Some(replication) => replication.readiness.ready().await,
        None => Ok(()),
    };
    match ready {
        Ok(()) => axum::Json(json!({"status": "ready"})).into_response(),
        Err(reason) => error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", None, &reason),
    }
}

/// With `?consistent` (or `consistent=true`), waits until this node has applied
/// every change acknowledged before the request (a linearizable read); otherwise
/// answers from what it has applied.
async fn consistent_if_asked(
    state: &AppState,
    query: &HashMap<String, String>,
) -> Result<(), Response> {
    let asked = query
        .get("consistent")
        .is_some_and(|v| v.is_empty() || v == "true" || v == "1");
    if asked {
        state
            .registry
            .read_barrier()
            .await
            .map_err(IntoResponse::into_response)?;
    }
    Ok(())
}

/// What reading the whole table (`/v1/services`, `/v1/watch`) asks for: `read` on
/// a pattern that matches `*`, such as `*` itself.
const EVERY_SERVICE: Resource<'static> = Resource::Service("*");

/// `GET /v1/services`: every instance with its health.
async fn list_all(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    peer: Peer,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(err) = allowed(&state, (&headers, &peer), Action::Read, EVERY_SERVICE) {
        return err.into_response();
    }
    if let Err(response) = consistent_if_asked(&state, &query).await {
        return response;
    }
    everything(&state)
}

fn everything(state: &AppState) -> Response {
    let (index, instances) = state.registry.snapshot();
    axum::Json(json!({"index": index, "instances": instances})).into_response()
}

/// `GET /v1/services/{name}`: the available instances; `?all=true` for every one.
async fn list_service(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    peer: Peer,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(err) = validate_service_name(name.clone(), "name") {
        return err.into_response();
    }
    if let Err(err) = allowed(
        &state,
        (&headers, &peer),
        Action::Read,
        Resource::Service(&name),
    ) {
        return err.into_response();
    }
    if let Err(response) = consistent_if_asked(&state, &query).await {
        return response;
    }
    let all = query.get("all").is_some_and(|v| v == "true" || v == "1");
    match state.registry.instances_json(&name, all) {
        Ok(body) => (
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(err) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            None,
            &format!("encoding the instances failed: {err}"),
        ),
    }
}

/// `GET /v1/watch?index=N&wait=30s`: answers as soon as the change index passes `N`,
/// or when `wait` is over, with the index and every instance. With `changes=true`,
/// only the services changed since `N` (see [`crate::Delta`]).
async fn watch(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    peer: Peer,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(err) = allowed(&state, (&headers, &peer), Action::Read, EVERY_SERVICE) {
        return err.into_response();
    }
    let after: u64 = match query.get("index").map(|v| v.parse()) {
        None => 0,
        Some(Ok(index)) => index,
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                Some("index"),
                "index must be a whole number",
            );
        }
    };
    let wait = match query.get("wait").map(|v| humantime::parse_duration(v)) {
        None => Duration::from_secs(30),
        Some(Ok(wait)) => wait,
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                Some("wait"),
                "wait must be a duration such as 30s",
            );
        }
    }
    .min(state.config.max_watch_wait);
    let changes = query
        .get("changes")
        .is_some_and(|v| v == "true" || v == "1");
    let mut index = state.registry.watch_index();
    tokio::select! {
        _ = tokio::time::timeout(wait, index.wait_for(|&current| current > after)) => {}
        () = state.stopping.cancelled() => {}
    }
    if !changes {
        return everything(&state);
    }
    let delta = state.registry.changes_since(after);
    axum::Json(json!({
        "index": delta.index,
        "full": delta.full,
        "changed": delta.changed,
        "instances": delta.instances,
    }))
    .into_response()
}

/// `GET /v1/watch/stream`: Server-Sent Events, one per availability change.
async fn watch_stream(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    peer: Peer,
) -> Response {
    if let Err(err) = allowed(&state, (&headers, &peer), Action::Read, EVERY_SERVICE) {
        return err.into_response();
    }
    let changes = BroadcastStream::new(state.registry.subscribe()).map(|change| {
        Ok::<_, Infallible>(match change {
            Ok(change) => SseEvent::default()
                .event(change.kind)
                .id(change.index.to_string())
                .data(serde_json::to_string(&change.instance).unwrap_or_default()),
            // A watcher that fell behind must re-read the full state.
            Err(BroadcastStreamRecvError::Lagged(missed)) => {
                SseEvent::default().event("resync").data(missed.to_string())
            }
        })
    });
    let stopping = state.stopping.clone().cancelled_owned();
    Sse::new(changes.take_until(stopping))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let (index, instances) = state.registry.snapshot();
    let passing = instances.iter().filter(|i| i.is_available()).count();
    let notifier = &state.registry.notifier().stats;
    let mut out = Prometheus::default();
    out.family(
        "keel_registry_instances",
        "gauge",
        "Registered instances by health.",
    )
    .sample(&[("health", "passing")], passing)
    .sample(&[("health", "critical")], instances.len() - passing)
    .family(
        "keel_registry_index",
        "counter",
        "The registry's change index.",
    )
    .sample(&[], index)
    .family(
        "keel_registry_checks_total",
        "counter",
        "Health checks made.",
    )
    .sample(&[], state.checks.checks.load(Ordering::Relaxed))
    .family(
        "keel_registry_checks_failed_total",
        "counter",
        "Health checks that failed.",
    )
    .sample(&[], state.checks.failed.load(Ordering::Relaxed))
    .family(
        "keel_registry_notifications_total",
        "counter",
        "Notifications by outcome.",
    );
    for (outcome, counter) in [
        ("delivered", &notifier.delivered),
        ("failed", &notifier.failed),
        ("dropped", &notifier.dropped),
    ] {
        out.sample(&[("outcome", outcome)], counter.load(Ordering::Relaxed));
    }
    if let Some(replication) = state.registry.replication() {
        keel_raft::render_metrics(replication.raft(), &mut out);
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
