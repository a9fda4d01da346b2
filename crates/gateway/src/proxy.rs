//! The reverse proxy: read a request, route, pick, forward, retry, eject, relay.
//!
//! One task serves one client connection, and drives the upstream connection of each
//! exchange itself: the request is read, sent upstream, and the answer relayed
//! without another task, channel or thread in between. Bodies stream through buffers
//! of bounded size.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::io::{IoSlice, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use bytes::{Buf as _, Bytes, BytesMut};
use http::{Method, StatusCode};
use keel_registry::client::{Discovery, Policy, ServiceInstance};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::config::{Balance, GatewayConfig};
use crate::http1::{
    Chunked, Framing, HeadError, HeadLimits, Piece, Relay, RequestHead, ResponseHead, own_response,
    parse_request, parse_response, put_header,
};
use crate::upstream::{READ_BUFFER, Upstream, Upstreams};

/// Room kept free in a read buffer before reading into it.
const READ_ROOM: usize = 4 * 1024;

/// How much a buffer grows when it needs room: also the most a body moves at once.
const BODY_CHUNK: usize = 64 * 1024;

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
    access_log: Option<keel_log_client::Shipper>,
}

/// One serving thread's view of the gateway: the shared state, and its own pool of
/// upstream connections, so that a request and its upstream connection are driven by
/// the same thread.
#[derive(Debug)]
pub(crate) struct Gateway {
    shared: Arc<Shared>,
    upstreams: Upstreams,
}

impl std::ops::Deref for Gateway {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Gateway {
    pub(crate) fn new(config: GatewayConfig, discovery: Discovery) -> Self {
        let upstreams = Upstreams::new(config.connect_timeout);
        let access_log = config
            .log_service
            .as_deref()
            .map(|url| keel_log_client::Shipper::new(url, "access", 8192));
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

    fn count(&self, status: u16) {
        if let Some(counter) = self.stats.by_status.get(usize::from(status / 100)) {
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

/// A connection's scratch space, reused by each request on it.
#[derive(Default)]
struct Scratch {
    /// The request's header lines as forwarded, `X-Forwarded-*` and the id included.
    headers: Vec<u8>,
    /// The `X-Forwarded-For` the client sent, if any.
    forwarded_for: Vec<u8>,
    /// The `X-Forwarded-Prefix` the client sent, if any.
    forwarded_prefix: Vec<u8>,
    /// The `Host` the client sent, if any.
    host: Vec<u8>,
    has_request_id: bool,
    /// The head sent upstream.
    upstream_head: Vec<u8>,
    /// The head sent to the client.
    out: Vec<u8>,
}

impl Scratch {
    fn clear(&mut self) {
        self.headers.clear();
        self.forwarded_for.clear();
        self.forwarded_prefix.clear();
        self.host.clear();
        self.has_request_id = false;
    }
}

/// A request refused by the gateway itself: status, error code, message.
struct Refusal(StatusCode, &'static str, String);

fn no_healthy_instance(service: &str) -> Refusal {
    Refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_healthy_instance",
        format!("service {service:?} has no healthy instance"),
    )
}

/// Writes a refusal as the gateway's JSON error.
fn refusal_response(out: &mut Vec<u8>, refusal: &Refusal, relay: Relay) {
    let Refusal(status, code, message) = refusal;
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    own_response(out, *status, "application/json", body.as_bytes(), relay);
}

/// Makes room to read into `buf`.
fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_ROOM {
        buf.reserve(BODY_CHUNK);
    }
}

/// What the access log says about a request besides its line.
#[derive(Default)]
struct Routed {
    service: Option<String>,
    instance: Option<Arc<ServiceInstance>>,
}

/// An upstream's answer, its head already written for the client into `Scratch::out`.
struct Answer {
    upstream: Upstream,
    /// The instance that answered, whose pool the connection goes back to.
    instance: Arc<ServiceInstance>,
    head: ResponseHead,
}

/// An instance URL's `host:port` and base path (without its leading `/`).
fn split_url(url: &str) -> (&str, &str) {
    let without_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    without_scheme
        .split_once('/')
        .unwrap_or((without_scheme, ""))
}

/// The body of a request that may be retried, or the stream of one that may not.
enum Payload {
    Buffered(Bytes),
    Streaming,
}

/// Why an attempt on one instance failed.
enum Failure {
    /// No connection: nothing was sent.
    Connect(std::io::Error),
    /// The request was (or may have been) sent, then the exchange failed.
    Sent(String),
    /// The client's body broke off or was malformed: nothing to retry.
    Client(String),
}

/// A client connection: its stream, and the bytes read from it and not used yet.
struct Client<C> {
    stream: C,
    buf: BytesMut,
}

impl<C: AsyncRead + Unpin> Client<C> {
    /// The next `len` bytes (a request body), each read arriving within `idle`.
    async fn take(&mut self, len: usize, idle: std::time::Duration) -> Result<Bytes, Refusal> {
        while self.buf.len() < len {
            self.buf.reserve(len - self.buf.len());
            match tokio::time::timeout(idle, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0) | Err(_)) | Err(_) => {
                    return Err(Refusal(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!(
                            "the request body ended after {} of {len} bytes",
                            self.buf.len()
                        ),
                    ));
                }
                Ok(Ok(_)) => {}
            }
        }
        Ok(self.buf.split_to(len).freeze())
    }
}

/// One client connection being served, and what each request on it reuses.
struct Connection<C> {
    gateway: Arc<Gateway>,
    client: Client<C>,
    scratch: Scratch,
    peer: SocketAddr,
    stop: CancellationToken,
}

/// One request under way.
struct Exchange {
    head: RequestHead,
    id: u64,
    routed: Routed,
    relay: Relay,
    /// Whether the request body has been read whole.
    consumed: bool,
}

/// Serves one client connection until it closes, goes idle for the idle timeout, or
/// `stop` is cancelled (between requests).
pub(crate) async fn serve_connection<C>(
    gateway: Arc<Gateway>,
    stream: C,
    peer: SocketAddr,
    stop: CancellationToken,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let connection = Connection {
        gateway,
        client: Client {
            stream,
            buf: BytesMut::with_capacity(READ_BUFFER),
        },
        scratch: Scratch::default(),
        peer,
        stop,
    };
    connection.serve().await;
}

impl<C> Connection<C>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    async fn serve(mut self) {
        loop {
            let head = match self.read_head().await {
                Ok(Some(head)) => head,
                Ok(None) => break,
                Err(err) => {
                    self.refuse_head(err).await;
                    break;
                }
            };
            self.client.buf.advance(head.len);
            if !self.exchange(head).await {
                break;
            }
        }
        let _ = self.client.stream.shutdown().await;
    }

    /// Answers a request head that was refused; the connection closes after.
    async fn refuse_head(&mut self, err: HeadError) {
        let (status, code) = match &err {
            HeadError::TooLarge(_) => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
            ),
            HeadError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            HeadError::Unsupported(_) => (StatusCode::NOT_IMPLEMENTED, "not_implemented"),
        };
        let (HeadError::TooLarge(message)
        | HeadError::Invalid(message)
        | HeadError::Unsupported(message)) = err;
        self.gateway.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.gateway.count(status.as_u16());
        let relay = Relay {
            http10: false,
            keep_alive: false,
        };
        let out = &mut self.scratch.out;
        refusal_response(out, &Refusal(status, code, message), relay);
        let _ = self.client.stream.write_all(out).await;
    }

    /// Reads the next request head into `buf`: `None` when the connection closes or idles
    /// out before one begins, or `stop` is cancelled while none is under way.
    async fn read_head(&mut self) -> Result<Option<RequestHead>, HeadError> {
        let Self {
            gateway,
            client: Client {
                stream: client,
                buf,
            },
            scratch,
            stop,
            ..
        } = self;
        let limits = HeadLimits {
            header_bytes: gateway.config.max_header_bytes,
        };
        loop {
            if !buf.is_empty() {
                scratch.clear();
                let Scratch {
                    headers,
                    forwarded_for,
                    forwarded_prefix,
                    host,
                    has_request_id,
                    ..
                } = scratch;
                let parsed = parse_request(
                    buf,
                    limits,
                    |name, value| {
                        if name.eq_ignore_ascii_case("x-forwarded-for") {
                            if !forwarded_for.is_empty() {
                                forwarded_for.extend_from_slice(b", ");
                            }
                            forwarded_for.extend_from_slice(value);
                        } else if name.eq_ignore_ascii_case("x-forwarded-prefix") {
                            forwarded_prefix.clear();
                            forwarded_prefix.extend_from_slice(value);
                        } else if !name.eq_ignore_ascii_case("x-forwarded-proto")
                            && !name.eq_ignore_ascii_case("x-forwarded-host")
                        {
                            *has_request_id |= name.eq_ignore_ascii_case("x-request-id");
                            put_header(headers, name.as_bytes(), value);
                        }
                    },
                    host,
                )?;
                if parsed.is_some() {
                    return Ok(parsed);
                }
            }
            reserve(buf);
            let idle = gateway.config.idle_timeout;
            // On shutdown, a head not read whole yet is dropped: nothing was answered.
            let read = tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(None),
                read = tokio::time::timeout(idle, client.read_buf(buf)) => read,
            };
            match read {
                Ok(Ok(0) | Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
                Err(_) if buf.is_empty() => return Ok(None),
                Err(_) => {
                    return Err(HeadError::Invalid(format!(
                        "the request head did not arrive within {idle:?}"
                    )));
                }
            }
        }
    }

    /// One request, from its head to the end of its answer. Returns whether the client
    /// connection stays open.
    async fn exchange(&mut self, head: RequestHead) -> bool {
        self.gateway.stats.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let mut exchange = Exchange {
            id: self.gateway.next_id.fetch_add(1, Ordering::Relaxed),
            routed: Routed::default(),
            relay: Relay {
                http10: head.http10,
                keep_alive: head.keep_alive && !self.stop.is_cancelled(),
            },
            consumed: head.framing == Framing::Empty,
            head,
        };
        let forwarded = self.forward(&mut exchange).await;
        let Self {
            gateway,
            client: Client { stream: client, .. },
            scratch,
            peer,
            ..
        } = self;
        let Exchange {
            head,
            id,
            routed,
            mut relay,
            consumed,
        } = exchange;
        let status = match &forwarded {
            Ok(answer) => answer.head.status,
            Err(Refusal(status, ..)) => status.as_u16(),
        };
        gateway.count(status);
        if let Some(access_log) = &gateway.access_log {
            // Time to the response head; bodies keep streaming after this.
            access_log.ship(format!(
                "{} {} {status} {}us service={} instance={} id={id:016x} peer={}",
                head.method,
                head.target.split('?').next().unwrap_or(""),
                started.elapsed().as_micros(),
                routed.service.as_deref().unwrap_or("-"),
                routed
                    .instance
                    .as_ref()
                    .map_or("-", |instance| instance.url.as_str()),
                peer.ip(),
            ));
        }
        match forwarded {
            Ok(Answer {
                mut upstream,
                instance,
                head: response,
            }) => {
                let relayed = relay_body(
                    gateway,
                    client,
                    &scratch.out,
                    &mut upstream,
                    response.framing,
                    relay,
                )
                .await;
                // A request body cut short by an early answer leaves the connection
                // mid-request: it cannot carry another one.
                if relayed && response.keep_alive && consumed {
                    gateway.upstreams.put(split_url(&instance.url).0, upstream);
                }
                relayed && relay.keep_alive
            }
            Err(refusal) => {
                // A body left unread in the connection ends it.
                relay.keep_alive &= consumed;
                refusal_response(&mut scratch.out, &refusal, relay);
                client.write_all(&scratch.out).await.is_ok() && relay.keep_alive
            }
        }
    }

    /// Routes the request, sends it to an instance (retrying as the config allows), and
    /// reads the answer's head.
    async fn forward(&mut self, exchange: &mut Exchange) -> Result<Answer, Refusal> {
        let Self {
            gateway,
            client,
            scratch,
            peer,
            ..
        } = self;
        let Exchange {
            head,
            id,
            routed,
            relay,
            consumed,
        } = exchange;
        let (head, id) = (&*head, *id);
        let (path, query) = match head.target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (head.target.as_str(), None),
        };
        let Some(segment) = path.split('/').nth(1).filter(|s| !s.is_empty()) else {
            return Err(Refusal(
                StatusCode::NOT_FOUND,
                "no_service",
                "no service in the path: use /{service}/...".into(),
            ));
        };
        let Ok(service) = keel_registry::validate_service_name(segment.to_owned(), "service")
        else {
            return Err(Refusal(
                StatusCode::NOT_FOUND,
                "unknown_service",
                format!("no service named {segment:?}"),
            ));
        };
        // The first choice, before the body is read: no instance at all is a 404 or a 503.
        let ejected = gateway.ejected();
        let first = gateway
            .discovery
            .pick_where(&service, gateway.policy(), |instance| {
                !ejected.contains(&instance.url)
            });
        let Some(first) = first else {
            let known = gateway
                .known
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&service);
            let refusal = if !known && gateway.discovery.instances(&service).is_empty() {
                Refusal(
                    StatusCode::NOT_FOUND,
                    "unknown_service",
                    format!("service {service:?} is not registered"),
                )
            } else {
                no_healthy_instance(&service)
            };
            routed.service = Some(service);
            return Err(refusal);
        };
        let stripped = gateway.config.strip_prefix.contains(&service);
        let target: Cow<'_, str> = if stripped {
            let rest = &path[service.len() + 1..];
            let rest = if rest.is_empty() { "/" } else { rest };
            match query {
                Some(query) => Cow::Owned(format!("{rest}?{query}")),
                None => Cow::Borrowed(rest),
            }
        } else {
            Cow::Borrowed(head.target.as_str())
        };

        // A retry needs the body again: small bodies are buffered, large ones stream once.
        let payload = match head.framing {
            Framing::Empty => Payload::Buffered(Bytes::new()),
            Framing::Length(len) if len <= gateway.config.retry_body_bytes => {
                continue_if_expected(&mut client.stream, head).await?;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                let body = client.take(len, gateway.config.idle_timeout).await?;
                *consumed = true;
                Payload::Buffered(body)
            }
            Framing::Length(_) | Framing::Chunked | Framing::UntilClose => Payload::Streaming,
        };

        // The forwarded headers, completed.
        let headers = &mut scratch.headers;
        headers.extend_from_slice(b"x-forwarded-for: ");
        if !scratch.forwarded_for.is_empty() {
            headers.extend_from_slice(&scratch.forwarded_for);
            headers.extend_from_slice(b", ");
        }
        let _ = write!(headers, "{}\r\nx-forwarded-proto: http\r\n", peer.ip());
        if !scratch.host.is_empty() {
            put_header(headers, b"x-forwarded-host", &scratch.host);
        }
        if !scratch.has_request_id {
            let _ = write!(headers, "x-request-id: {id:016x}\r\n");
        }
        if stripped {
            // Lets the instance build links that go back through the gateway.
            let _ = write!(headers, "x-forwarded-prefix: /{service}\r\n");
        } else if !scratch.forwarded_prefix.is_empty() {
            put_header(headers, b"x-forwarded-prefix", &scratch.forwarded_prefix);
        }
        match (&payload, head.framing) {
            (_, Framing::Empty) => {}
            (Payload::Buffered(body), _) => {
                let _ = write!(headers, "content-length: {}\r\n", body.len());
            }
            (Payload::Streaming, Framing::Length(len)) => {
                let _ = write!(headers, "content-length: {len}\r\n");
            }
            (Payload::Streaming, _) => headers.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
        headers.extend_from_slice(b"\r\n");

        let idempotent = is_idempotent(&head.method);
        // Instances that failed this request; empty unless it is retried.
        let mut tried: Vec<String> = Vec::new();
        let mut last_failure = None;
        let mut next = Some(first);
        let service: &str = routed.service.insert(service);
        for attempt in 0..=gateway.config.retries {
            let picked = match next.take() {
                Some(picked) => picked,
                None => {
                    let ejected = gateway.ejected();
                    let picked =
                        gateway
                            .discovery
                            .pick_where(service, gateway.policy(), |instance| {
                                !tried.contains(&instance.url) && !ejected.contains(&instance.url)
                            });
                    let Some(picked) = picked else { break };
                    picked
                }
            };
            let instance = Arc::clone(&picked.instance);
            let url = instance.url.as_str();
            routed.instance = Some(Arc::clone(&instance));
            if attempt > 0 {
                gateway.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            if url.starts_with("https://") {
                return Err(Refusal(
                    StatusCode::BAD_GATEWAY,
                    "bad_upstream",
                    format!(
                        "instance {url} of {service:?} uses https, which the gateway does not speak to upstreams yet"
                    ),
                ));
            }
            // Origin-form request line and an explicit Host: the connection is to the
            // instance itself, not through a proxy.
            let (authority, base_path) = split_url(url);
            let request_head = &mut scratch.upstream_head;
            request_head.clear();
            request_head.extend_from_slice(head.method.as_str().as_bytes());
            request_head.push(b' ');
            if !base_path.is_empty() {
                request_head.push(b'/');
                request_head.extend_from_slice(base_path.trim_end_matches('/').as_bytes());
            }
            let _ = write!(request_head, "{target} HTTP/1.1\r\nhost: {authority}\r\n");
            request_head.extend_from_slice(&scratch.headers);

            let exchanged = tokio::time::timeout(
                gateway.config.request_timeout,
                attempt_on(
                    gateway, authority, &payload, client, head, relay, consumed, scratch,
                ),
            )
            .await;
            match exchanged {
                Ok(Ok((upstream, response))) => {
                    gateway.record(url, true);
                    // The picked guard (in-flight count) lives until the head is back.
                    drop(picked);
                    return Ok(Answer {
                        upstream,
                        instance,
                        head: response,
                    });
                }
                Ok(Err(Failure::Client(message))) => {
                    relay.keep_alive = false;
                    return Err(Refusal(StatusCode::BAD_REQUEST, "bad_request", message));
                }
                Ok(Err(err)) => {
                    gateway.record(url, false);
                    // Nothing was sent on a failed connect: safe to retry for any method.
                    let (connect, message) = match err {
                        Failure::Connect(err) => (true, format!("connect failed: {err}")),
                        Failure::Sent(message) | Failure::Client(message) => (false, message),
                    };
                    let retry = matches!(payload, Payload::Buffered(_)) && (connect || idempotent);
                    tracing::debug!(url, error = %message, retry, "upstream failed");
                    last_failure = Some(format!("instance {url} of {service:?} failed: {message}"));
                    if !retry {
                        break;
                    }
                    tried.push(url.to_owned());
                }
                Err(_) => {
                    gateway.record(url, false);
                    return Err(Refusal(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        format!(
                            "instance {url} of {service:?} did not answer within {:?}",
                            gateway.config.request_timeout
                        ),
                    ));
                }
            }
        }
        Err(match last_failure {
            Some(message) => Refusal(StatusCode::BAD_GATEWAY, "upstream_failed", message),
            None => no_healthy_instance(service),
        })
    }
}

/// Answers `100 Continue` to a client that waits for it before sending its body.
async fn continue_if_expected<C>(client: &mut C, head: &RequestHead) -> Result<(), Refusal>
where
    C: AsyncWrite + Unpin,
{
    if head.expect_continue && !head.http10 {
        client
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|err| {
                Refusal(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("the client connection failed: {err}"),
                )
            })?;
    }
    Ok(())
}

/// One attempt on one instance: sends the request and reads the answer's head. A
/// pooled connection that the upstream closed under us, before any answer, is
/// replaced by a new one for a request that may be sent twice.
#[allow(clippy::too_many_arguments)]
async fn attempt_on<C>(
    gateway: &Gateway,
    authority: &str,
    payload: &Payload,
    client: &mut Client<C>,
    head: &RequestHead,
    relay: &mut Relay,
    consumed: &mut bool,
    scratch: &mut Scratch,
) -> Result<(Upstream, ResponseHead), Failure>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (request_head, out) = (&scratch.upstream_head, &mut scratch.out);
    let mut upstream = gateway
        .upstreams
        .get(authority)
        .await
        .map_err(Failure::Connect)?;
    loop {
        let sent = match payload {
            Payload::Buffered(body) => write_both(&mut upstream.stream, request_head, body)
                .await
                .map_err(|err| Failure::Sent(format!("sending the request failed: {err}"))),
            Payload::Streaming => {
                send_streaming(client, head, &mut upstream, request_head)
                    .await
                    .map(|whole| {
                        *consumed = whole;
                        // An answer before the whole body: the rest stays unread.
                        relay.keep_alive &= whole;
                    })
            }
        };
        let answered = match sent {
            Ok(()) => read_response_head(&mut upstream, &head.method, relay, out).await,
            Err(err) => Err(err),
        };
        match answered {
            Ok(response) => return Ok((upstream, response)),
            Err(Failure::Sent(_))
                if upstream.reused
                    && upstream.buf.is_empty()
                    && matches!(payload, Payload::Buffered(_))
                    && is_idempotent(&head.method) =>
            {
                upstream = gateway
                    .upstreams
                    .connect(authority)
                    .await
                    .map_err(Failure::Connect)?;
            }
            Err(err) => return Err(err),
        }
    }
}

/// Sends the request head, then the body as it streams from the client. Returns
/// whether the whole body went out: the upstream may answer before reading it all,
/// and then the rest is not sent.
async fn send_streaming<C>(
    client: &mut Client<C>,
    head: &RequestHead,
    upstream: &mut Upstream,
    request_head: &[u8],
) -> Result<bool, Failure>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut from_upstream, mut to_upstream) = upstream.stream.split();
    to_upstream
        .write_all(request_head)
        .await
        .map_err(|err| Failure::Sent(format!("sending the request failed: {err}")))?;
    continue_if_expected(&mut client.stream, head)
        .await
        .map_err(|Refusal(.., message)| Failure::Client(message))?;
    let copy = copy_request_body(client, head.framing, &mut to_upstream);
    tokio::pin!(copy);
    reserve(&mut upstream.buf);
    tokio::select! {
        biased;
        copied = &mut copy => copied.map(|()| true),
        early = from_upstream.read_buf(&mut upstream.buf) => match early {
            Ok(0) => Err(Failure::Sent("the upstream closed the connection during the request body".into())),
            Ok(_) => Ok(false),
            Err(err) => Err(Failure::Sent(format!("reading the answer failed: {err}"))),
        },
    }
}

/// Copies a request body of `framing` from the client (what `buf` holds first) to the
/// upstream, leaving in `buf` what follows it.
async fn copy_request_body<C, U>(
    client: &mut Client<C>,
    framing: Framing,
    upstream: &mut U,
) -> Result<(), Failure>
where
    C: AsyncRead + Unpin,
    U: AsyncWrite + Unpin,
{
    let Client {
        stream: client,
        buf,
    } = client;
    let mut left = match framing {
        Framing::Length(len) => len,
        Framing::Chunked => u64::MAX,
        Framing::Empty | Framing::UntilClose => return Ok(()),
    };
    let mut chunked = Chunked::default();
    loop {
        if buf.is_empty() {
            reserve(buf);
            match client.read_buf(buf).await {
                Ok(0) => return Err(Failure::Client("the request body ended early".into())),
                Ok(_) => {}
                Err(err) => {
                    return Err(Failure::Client(format!(
                        "reading the request body failed: {err}"
                    )));
                }
            }
        }
        let take = if framing == Framing::Chunked {
            body_extent(&mut chunked, buf)
                .map_err(|err| Failure::Client(format!("malformed chunked request body: {err}")))?
        } else {
            usize::try_from(left).unwrap_or(usize::MAX).min(buf.len())
        };
        upstream
            .write_all(&buf[..take])
            .await
            .map_err(|err| Failure::Sent(format!("sending the request body failed: {err}")))?;
        buf.advance(take);
        left -= take as u64;
        if left == 0 || chunked.is_done() {
            return Ok(());
        }
    }
}

/// How many bytes at the start of `buf` belong to the chunked body `state` reads
/// (framing and data alike), stopping at its end.
fn body_extent(state: &mut Chunked, buf: &[u8]) -> Result<usize, String> {
    let mut at = 0;
    while let Some(piece) = state.next(&buf[at..])? {
        match piece {
            Piece::Data(n) | Piece::Framing(n) => at += n,
            Piece::End(n) => return Ok(at + n),
        }
    }
    Ok(at)
}

/// Reads the answer's head (past any interim 1xx answers) and writes the client's.
async fn read_response_head(
    upstream: &mut Upstream,
    method: &Method,
    relay: &mut Relay,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, Failure> {
    loop {
        if !upstream.buf.is_empty() {
            match parse_response(&upstream.buf, method, relay, out) {
                Ok(Some(response)) => {
                    upstream.buf.advance(response.len);
                    match response.status {
                        101 => {
                            return Err(Failure::Sent(
                                "the upstream switched protocols, which the gateway does not relay"
                                    .into(),
                            ));
                        }
                        100..=199 => continue,
                        _ => return Ok(response),
                    }
                }
                Ok(None) => {}
                Err(
                    HeadError::Invalid(message)
                    | HeadError::TooLarge(message)
                    | HeadError::Unsupported(message),
                ) => return Err(Failure::Sent(message)),
            }
        }
        reserve(&mut upstream.buf);
        match upstream.stream.read_buf(&mut upstream.buf).await {
            Ok(0) => {
                return Err(Failure::Sent(
                    "the upstream closed the connection before answering".into(),
                ));
            }
            Ok(_) => {}
            Err(err) => return Err(Failure::Sent(format!("reading the answer failed: {err}"))),
        }
    }
}

/// Writes `first` and then `second`, in one system call when the socket takes both.
async fn write_both<W>(to: &mut W, mut first: &[u8], second: &[u8]) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    if second.is_empty() {
        return to.write_all(first).await;
    }
    let mut second = second;
    while !first.is_empty() {
        let n = to
            .write_vectored(&[IoSlice::new(first), IoSlice::new(second)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        if n < first.len() {
            first = &first[n..];
        } else {
            second = &second[n - first.len()..];
            first = &[];
        }
    }
    to.write_all(second).await
}

/// Writes the answer's head (in `client_head`) and relays its body from the upstream.
/// Returns whether the body went through whole (the upstream connection may then be
/// reused).
async fn relay_body<C>(
    gateway: &Gateway,
    client: &mut C,
    client_head: &[u8],
    upstream: &mut Upstream,
    framing: Framing,
    relay: Relay,
) -> bool
where
    C: AsyncWrite + Unpin,
{
    if framing == Framing::Chunked && relay.http10 {
        return client.write_all(client_head).await.is_ok()
            && relay_decoded(gateway, client, upstream).await;
    }
    let mut left = match framing {
        Framing::Empty => 0,
        Framing::Length(len) => len,
        Framing::Chunked | Framing::UntilClose => u64::MAX,
    };
    let mut chunked = Chunked::default();
    // The head goes out with the first bytes of the body when they are here already.
    let mut head = client_head;
    loop {
        if left == 0 || chunked.is_done() {
            return head.is_empty() || client.write_all(head).await.is_ok();
        }
        if upstream.buf.is_empty() {
            if !head.is_empty() {
                if client.write_all(head).await.is_err() {
                    return false;
                }
                head = &[];
            }
            match read_body(gateway, upstream).await {
                Some(0) => return framing == Framing::UntilClose,
                Some(_) => {}
                None => return false,
            }
        }
        let take = if framing == Framing::Chunked {
            match body_extent(&mut chunked, &upstream.buf) {
                Ok(take) => take,
                Err(err) => {
                    tracing::debug!(error = %err, "malformed chunked answer");
                    return false;
                }
            }
        } else {
            usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(upstream.buf.len())
        };
        if write_both(client, head, &upstream.buf[..take])
            .await
            .is_err()
        {
            return false;
        }
        head = &[];
        upstream.buf.advance(take);
        left = left.saturating_sub(take as u64);
    }
}

/// Relays the data of a chunked body without its framing (for HTTP/1.0 clients, who
/// read until the connection closes).
async fn relay_decoded<C>(gateway: &Gateway, client: &mut C, upstream: &mut Upstream) -> bool
where
    C: AsyncWrite + Unpin,
{
    let mut chunked = Chunked::default();
    loop {
        match chunked.next(&upstream.buf) {
            Ok(Some(Piece::Data(n))) => {
                if client.write_all(&upstream.buf[..n]).await.is_err() {
                    return false;
                }
                upstream.buf.advance(n);
            }
            Ok(Some(Piece::Framing(n))) => upstream.buf.advance(n),
            Ok(Some(Piece::End(n))) => {
                upstream.buf.advance(n);
                return true;
            }
            Ok(None) => match read_body(gateway, upstream).await {
                Some(0) | None => return false,
                Some(_) => {}
            },
            Err(err) => {
                tracing::debug!(error = %err, "malformed chunked answer");
                return false;
            }
        }
    }
}

/// Reads more of an answer's body: `None` when the upstream fails or sends nothing
/// for the request timeout.
async fn read_body(gateway: &Gateway, upstream: &mut Upstream) -> Option<usize> {
    reserve(&mut upstream.buf);
    let read = upstream.stream.read_buf(&mut upstream.buf);
    tokio::time::timeout(gateway.config.request_timeout, read)
        .await
        .ok()?
        .ok()
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
