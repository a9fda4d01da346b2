//! The reverse proxy: route, pick, forward, retry, eject.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use keel_registry::client::{Discovery, Policy};

use crate::config::{Balance, GatewayConfig};
use crate::listener::Peer;
use crate::upstream::{UpstreamError, Upstreams};

/// Headers that belong to one connection, not to the request (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Counts for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) requests: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) ejections: AtomicU64,
    pub(crate) by_status: [AtomicU64; 6],
}

/// Failures of one instance since its last success, and its ejection if any.
#[derive(Debug, Default)]
struct Passive {
    failures: u32,
    ejected_until: Option<Instant>,
}

/// What every serving thread of the gateway shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: GatewayConfig,
    pub(crate) discovery: Discovery,
    /// Every service name the registry knows (passing or not): tells 404 from 503.
    pub(crate) known: RwLock<BTreeSet<String>>,
    passive: Mutex<HashMap<String, Passive>>,
    /// Entries in `passive`: while none fails, a request takes no lock for it.
    failing: AtomicUsize,
    pub(crate) stats: Stats,
    next_id: AtomicU64,
    access_log: Option<keel_log::Shipper>,
}

/// One serving thread's view of the gateway: the shared state, and its own pool of
/// upstream connections, so that a request and its upstream connection are driven by
/// the same thread.
#[derive(Debug)]
pub(crate) struct Gateway {
    shared: Arc<Shared>,
    upstreams: Arc<Upstreams>,
}

impl std::ops::Deref for Gateway {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// A gateway error: a status and a JSON body naming the service.
fn error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

impl Gateway {
    pub(crate) fn new(config: GatewayConfig, discovery: Discovery) -> Self {
        let upstreams = Upstreams::new(config.connect_timeout);
        let access_log = config
            .log_service
            .as_deref()
            .map(|url| keel_log::Shipper::new(url, "access", 8192));
        Self {
            shared: Arc::new(Shared {
                config,
                discovery,
                known: RwLock::default(),
                passive: Mutex::default(),
                failing: AtomicUsize::new(0),
                stats: Stats::default(),
                next_id: AtomicU64::new(1),
                access_log,
            }),
            upstreams,
        }
    }

    /// The view of another serving thread: the same shared state, its own pool.
    pub(crate) fn for_another_thread(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            upstreams: Upstreams::new(self.config.connect_timeout),
        }
    }
}

impl Shared {
    fn policy(&self) -> Policy {
        match self.config.balance {
            Balance::RoundRobin => Policy::RoundRobin,
            Balance::Random => Policy::Random,
            Balance::PowerOfTwoChoices => Policy::PowerOfTwoChoices,
        }
    }

    /// The instances ejected now (usually none, and then without a lock).
    fn ejected(&self) -> Vec<String> {
        if self.failing.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let mut passive = self.passive.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        // An ejection that ran out, with no failure since, is the same as no entry: the
        // map only holds instances failing now, however many come and go.
        passive.retain(|_, p| p.failures > 0 || p.ejected_until.is_some_and(|until| now < until));
        self.failing.store(passive.len(), Ordering::Release);
        passive
            .iter()
            .filter(|(_, p)| p.ejected_until.is_some_and(|until| now < until))
            .map(|(url, _)| url.clone())
            .collect()
    }

    fn record(&self, url: &str, ok: bool) {
        if ok && self.failing.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut passive = self.passive.lock().unwrap_or_else(PoisonError::into_inner);
        if ok {
            // A success clears the record (absent and default are the same state).
            passive.remove(url);
            self.failing.store(passive.len(), Ordering::Release);
            return;
        }
        let entry = passive.entry(url.to_owned()).or_default();
        entry.failures += 1;
        if entry.failures >= self.config.eject_after {
            entry.failures = 0;
            entry.ejected_until = Some(Instant::now() + self.config.eject_for);
            self.stats.ejections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(url, eject_for = ?self.config.eject_for, "ejecting an instance after consecutive failures");
        }
        self.failing.store(passive.len(), Ordering::Release);
    }

    fn count(&self, status: StatusCode) {
        let class = (status.as_u16() / 100) as usize;
        if let Some(counter) = self.stats.by_status.get(class) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    )
}

/// The request's headers as forwarded: hop-by-hop ones removed (also those the
/// `Connection` header names), `Host` left to the client, `X-Forwarded-*` and a
/// request id added.
fn forwarded_headers(headers: &HeaderMap, peer: SocketAddr, request_id: &str) -> HeaderMap {
    // Headers the Connection header names are hop-by-hop too (rare: parsed only then).
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len() + 4);
    for (name, value) in headers {
        let hop = HOP_BY_HOP.contains(&name.as_str()) || named.iter().any(|n| n == name.as_str());
        if !hop && name != header::HOST {
            out.append(name.clone(), value.clone());
        }
    }
    let peer_ip = peer.ip().to_string();
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {peer_ip}"),
        None => peer_ip,
    };
    let set = |out: &mut HeaderMap, name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            out.insert(HeaderName::from_static(name), value);
        }
    };
    set(&mut out, "x-forwarded-for", &forwarded_for);
    set(&mut out, "x-forwarded-proto", "http");
    if let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) {
        set(&mut out, "x-forwarded-host", host);
    }
    if !out.contains_key("x-request-id") {
        set(&mut out, "x-request-id", request_id);
    }
    out
}

/// The body of a request that may be retried, or the stream of one that may not.
enum Payload {
    Buffered(Bytes),
    Streaming(Option<Body>),
}

impl Payload {
    fn take(&mut self) -> Option<Body> {
        match self {
            Self::Buffered(bytes) => Some(Body::from(bytes.clone())),
            Self::Streaming(body) => body.take(),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Self::Buffered(_))
    }
}

/// What the access log says about a request besides its line.
#[derive(Default)]
struct Routed {
    service: Option<String>,
    instance: Option<String>,
}

/// Every request the gateway receives.
pub(crate) async fn handle(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    request: Request,
) -> Response {
    gateway.stats.requests.fetch_add(1, Ordering::Relaxed);
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len())
        .sum();
    if header_bytes > gateway.config.max_header_bytes {
        let response = error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "request headers of {header_bytes} bytes exceed the limit of {}",
                gateway.config.max_header_bytes
            ),
        );
        gateway.count(response.status());
        return response;
    }
    let started = Instant::now();
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let request_id = format!("{:016x}", gateway.next_id.fetch_add(1, Ordering::Relaxed));
    let mut routed = Routed::default();
    let response = proxy(&gateway, peer, request, &request_id, &mut routed).await;
    gateway.count(response.status());
    if let Some(access_log) = &gateway.access_log {
        // Time to the response headers; bodies keep streaming after this.
        access_log.ship(format!(
            "{method} {path} {} {}us service={} instance={} id={request_id} peer={}",
            response.status().as_u16(),
            started.elapsed().as_micros(),
            routed.service.as_deref().unwrap_or("-"),
            routed.instance.as_deref().unwrap_or("-"),
            peer.ip(),
        ));
    }
    response
}

async fn proxy(
    gateway: &Gateway,
    peer: SocketAddr,
    request: Request,
    request_id: &str,
    routed: &mut Routed,
) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let Some(segment) = path.split('/').nth(1).filter(|s| !s.is_empty()) else {
        return error(
            StatusCode::NOT_FOUND,
            "no_service",
            "no service in the path: use /{service}/...".into(),
        );
    };
    let Ok(service) = keel_registry::validate_service_name(segment.to_owned(), "service") else {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_service",
            format!("no service named {segment:?}"),
        );
    };
    routed.service = Some(service.clone());
    // The first choice, before the body is read: no instance at all is a 404 or a 503.
    let ejected = gateway.ejected();
    let Some(first) = gateway
        .discovery
        .pick_where(&service, gateway.policy(), |instance| {
            !ejected.contains(&instance.url)
        })
    else {
        let known = gateway
            .known
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&service);
        return if !known && gateway.discovery.instances(&service).is_empty() {
            error(
                StatusCode::NOT_FOUND,
                "unknown_service",
                format!("service {service:?} is not registered"),
            )
        } else {
            no_healthy_instance(&service)
        };
    };
    let stripped = gateway.config.strip_prefix.contains(&service);
    let forward_path = if stripped {
        let rest = &path[service.len() + 1..];
        if rest.is_empty() {
            "/".to_owned()
        } else {
            rest.to_owned()
        }
    } else {
        path.to_owned()
    };
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("{forward_path}?{query}"),
        None => forward_path,
    };

    // A retry needs the body again: small bodies are buffered, large ones stream once.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
    let mut payload = match declared {
        Some(len) if len <= gateway.config.retry_body_bytes => match body.collect().await {
            Ok(collected) => Payload::Buffered(collected.to_bytes()),
            Err(err) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("reading the request body failed: {err}"),
                );
            }
        },
        None if !chunked => Payload::Buffered(Bytes::new()),
        _ => Payload::Streaming(Some(body)),
    };

    let mut headers = forwarded_headers(&parts.headers, peer, request_id);
    if stripped {
        // Lets the instance build links that go back through the gateway.
        if let Ok(prefix) = HeaderValue::from_str(&format!("/{service}")) {
            headers.insert(HeaderName::from_static("x-forwarded-prefix"), prefix);
        }
    }
    let idempotent = is_idempotent(&parts.method);
    // Instances that failed this request; empty unless it is retried.
    let mut tried: Vec<String> = Vec::new();
    let mut last_failure = None;
    let mut next = Some(first);
    for attempt in 0..=gateway.config.retries {
        let picked = match next.take() {
            Some(picked) => picked,
            None => {
                let ejected = gateway.ejected();
                let picked = gateway
                    .discovery
                    .pick_where(&service, gateway.policy(), |instance| {
                        !tried.contains(&instance.url) && !ejected.contains(&instance.url)
                    });
                let Some(picked) = picked else { break };
                picked
            }
        };
        let instance = Arc::clone(&picked.instance);
        let url = instance.url.as_str();
        routed.instance = Some(url.to_owned());
        if attempt > 0 {
            gateway.stats.retries.fetch_add(1, Ordering::Relaxed);
        }
        let Some(body) = payload.take() else { break };
        if url.starts_with("https://") {
            return error(
                StatusCode::BAD_GATEWAY,
                "bad_upstream",
                format!(
                    "instance {url} of {service:?} uses https, which the gateway does not speak to upstreams yet"
                ),
            );
        }
        // Origin-form request line and an explicit Host: the connection is to the
        // instance itself, not through a proxy.
        let without_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
        let (authority, base_path) = without_scheme
            .split_once('/')
            .map_or((without_scheme, ""), |(a, p)| (a, p));
        let target = if base_path.is_empty() {
            path_and_query.clone()
        } else {
            format!("/{base_path}{path_and_query}")
        };
        let uri: Uri = match target.parse() {
            Ok(uri) => uri,
            Err(err) => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    "bad_upstream",
                    format!("instance {url} of {service:?} has an unusable URL: {err}"),
                );
            }
        };
        let mut upstream = hyper::Request::new(body);
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = uri;
        *upstream.headers_mut() = headers.clone();
        if let Ok(host) = HeaderValue::from_str(authority) {
            upstream.headers_mut().insert(header::HOST, host);
        }

        match tokio::time::timeout(
            gateway.config.request_timeout,
            gateway.upstreams.send(authority, upstream),
        )
        .await
        {
            Ok(Ok(response)) => {
                gateway.record(url, true);
                let (mut parts, body) = response.into_parts();
                for name in HOP_BY_HOP {
                    parts.headers.remove(name);
                }
                // The picked guard (in-flight count) lives until the headers are back.
                drop(picked);
                return Response::from_parts(parts, body);
            }
            Ok(Err(err)) => {
                gateway.record(url, false);
                // Nothing was sent on a failed connect: safe to retry for any method.
                let connect = matches!(err, UpstreamError::Connect(_));
                let retry = payload.replayable() && (connect || idempotent);
                tracing::debug!(url, error = %err, retry, "upstream failed");
                last_failure = Some(format!("instance {url} of {service:?} failed: {err}"));
                if !retry {
                    break;
                }
                tried.push(url.to_owned());
            }
            Err(_) => {
                gateway.record(url, false);
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!(
                        "instance {url} of {service:?} did not answer within {:?}",
                        gateway.config.request_timeout
                    ),
                );
            }
        }
    }
    match last_failure {
        Some(message) => error(StatusCode::BAD_GATEWAY, "upstream_failed", message),
        None => no_healthy_instance(&service),
    }
}

fn no_healthy_instance(service: &str) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_healthy_instance",
        format!("service {service:?} has no healthy instance"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(eject_after: u32, eject_for: std::time::Duration) -> Gateway {
        let config = GatewayConfig {
            eject_after,
            eject_for,
            ..GatewayConfig::default()
        };
        Gateway::new(config, Discovery::default())
    }

    #[test]
    fn consecutive_failures_should_eject_and_a_success_should_forgive() {
        let gateway = shared(2, std::time::Duration::from_secs(60));
        gateway.record("http://a", false);
        gateway.record("http://a", true);
        gateway.record("http://a", false);
        assert!(
            gateway.ejected().is_empty(),
            "a success in between resets the count"
        );
        gateway.record("http://a", false);
        assert_eq!(gateway.ejected(), vec!["http://a".to_owned()]);
        assert_eq!(gateway.stats.ejections.load(Ordering::Relaxed), 1);
        // Successes of other instances, lock-free or not, leave the ejection alone.
        gateway.record("http://b", true);
        assert_eq!(gateway.ejected(), vec!["http://a".to_owned()]);
    }

    #[test]
    fn an_ejection_should_end_after_its_cool_down_and_leave_nothing_behind() {
        let gateway = shared(1, std::time::Duration::ZERO);
        gateway.record("http://a", false);
        assert!(
            gateway.ejected().is_empty(),
            "a zero cool-down is over at once"
        );
        assert_eq!(gateway.failing.load(Ordering::Relaxed), 0);
        assert!(gateway.passive.lock().unwrap().is_empty());
    }
}
