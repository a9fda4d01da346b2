//! The connection loop: one task per client connection reads each request head,
//! runs the exchange (forward, then relay the response or send the gateway's own
//! error), writes the access log line, and closes on error, idle timeout or shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf as _, Bytes, BytesMut};
use keel_registry::client::ServiceInstance;
use keel_serve::http::ErrorBody;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::error::GatewayError;
use crate::forwarded::Forwarded;
use crate::gateway::Gateway;
use crate::http1::{
    Framing, HeadError, HeadLimits, Relay, RequestHead, ResponseHead, own_response, parse_request,
};
use crate::relay::{Downstream, relay_body, reserve, send_to_client};
use crate::upstream::{READ_BUFFER, Target, Upstream};

/// The body of a request that may be retried, or the stream of one that may not.
pub(crate) enum Payload {
    Buffered(Bytes),
    Streaming,
}

/// An upstream's response, its head already written for the client into `Scratch::out`.
pub(crate) struct UpstreamResponse {
    pub(crate) upstream: Upstream,
    /// The instance that responded, whose pool the connection goes back to.
    pub(crate) instance: Arc<ServiceInstance>,
    pub(crate) head: ResponseHead,
}

/// A connection's buffers, reused by each request on it.
#[derive(Default)]
pub(crate) struct Scratch {
    /// The request's headers as forwarded.
    pub(crate) forwarded: Forwarded,
    /// The head sent upstream.
    pub(crate) upstream_head: Vec<u8>,
    /// The head sent to the client.
    pub(crate) out: Vec<u8>,
}

/// One request under way.
pub(crate) struct Exchange {
    pub(crate) head: RequestHead,
    pub(crate) id: u64,
    /// The service routed to, once known (for the access log).
    pub(crate) service: Option<String>,
    /// The instance of the latest attempt (for the access log).
    pub(crate) instance: Option<Arc<ServiceInstance>>,
    pub(crate) relay: Relay,
    /// Whether the request body has been read whole.
    pub(crate) consumed: bool,
    pub(crate) payload: Payload,
}

/// One client connection being served, and what each request on it reuses.
pub(crate) struct ClientConnection<C> {
    pub(crate) gateway: Arc<Gateway>,
    pub(crate) downstream: Downstream<C>,
    pub(crate) scratch: Scratch,
    pub(crate) peer: SocketAddr,
    stop: CancellationToken,
    /// Marks the connection waiting while no request is under way, when a new client
    /// may have its slot.
    idle: keel_serve::Idle,
}

/// Serves one client connection until it closes, goes idle for the idle timeout,
/// `stop` is cancelled (between requests), or a new client takes its slot while it
/// waits for a request (`idle`).
pub(crate) async fn serve_connection<C>(
    gateway: Arc<Gateway>,
    stream: C,
    peer: SocketAddr,
    stop: CancellationToken,
    idle: keel_serve::Idle,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let connection = ClientConnection {
        idle,
        gateway,
        downstream: Downstream {
            stream,
            buf: BytesMut::with_capacity(READ_BUFFER),
        },
        scratch: Scratch::default(),
        peer,
        stop,
    };
    connection.serve().await;
}

impl<C> ClientConnection<C>
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
            self.downstream.buf.advance(head.len);
            if !self.exchange(head).await {
                break;
            }
        }
        let _ = self.downstream.stream.shutdown().await;
    }

    /// Answers a request head that was refused; the connection closes after.
    async fn refuse_head(&mut self, err: GatewayError) {
        self.gateway
            .stats
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.gateway.stats.count(err.status().as_u16());
        let relay = Relay {
            http10: false,
            keep_alive: false,
        };
        write_error(&mut self.scratch.out, &err, relay);
        let limit = self.gateway.config.send_timeout;
        send_to_client(&mut self.downstream.stream, &self.scratch.out, limit).await;
    }

    /// Reads the next request head: `None` when the connection closes or idles out
    /// before one begins, or `stop` is cancelled while none is under way. A head must
    /// arrive whole within `header_timeout` of its first byte, however the client
    /// spaces its bytes.
    async fn read_head(&mut self) -> Result<Option<RequestHead>, GatewayError> {
        let limits = HeadLimits {
            header_bytes: self.gateway.config.max_header_bytes,
        };
        let (idle, header_timeout) = (
            self.gateway.config.idle_timeout,
            self.gateway.config.header_timeout,
        );
        let mut deadline = None;
        let Downstream { stream, buf } = &mut self.downstream;
        self.idle.waiting();
        loop {
            if !buf.is_empty() {
                let forwarded = &mut self.scratch.forwarded;
                forwarded.clear();
                let mut host = std::mem::take(&mut forwarded.host);
                let parsed = parse_request(
                    buf,
                    limits,
                    |name, value| forwarded.take(name, value),
                    &mut host,
                );
                forwarded.host = host;
                if let Some(head) = parsed.map_err(refused_head)? {
                    self.idle.working();
                    return one_host(head).map(Some);
                }
            }
            let wait = if buf.is_empty() {
                idle
            } else {
                let deadline =
                    *deadline.get_or_insert_with(|| tokio::time::Instant::now() + header_timeout);
                deadline.saturating_duration_since(tokio::time::Instant::now())
            };
            reserve(buf);
            // On shutdown, a head not read whole yet is dropped: nothing was responded.
            // So is it when a new client needs this connection's slot: a request that
            // has not arrived whole in all the time the others took is not served.
            let read = tokio::select! {
                biased;
                () = self.stop.cancelled() => return Ok(None),
                () = self.idle.shed() => return Ok(None),
                read = tokio::time::timeout(wait, stream.read_buf(buf)) => read,
            };
            match read {
                Ok(Ok(0) | Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
                Err(_) if buf.is_empty() => return Ok(None),
                Err(_) => {
                    return Err(GatewayError::RequestTimeout {
                        part: "head",
                        after: header_timeout,
                    });
                }
            }
        }
    }

    /// One request, from its head to the end of its response. Returns whether the client
    /// connection stays open.
    async fn exchange(&mut self, head: RequestHead) -> bool {
        self.gateway
            .stats
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        let mut exchange = Exchange {
            id: self.gateway.next_id(),
            service: None,
            instance: None,
            relay: Relay {
                http10: head.http10,
                keep_alive: head.keep_alive && !self.stop.is_cancelled(),
            },
            consumed: head.framing == Framing::Empty,
            payload: Payload::Streaming,
            head,
        };
        let forwarded = self.forward(&mut exchange).await;
        let status = match &forwarded {
            Ok(response) => {
                self.gateway
                    .stats
                    .upstream_latency
                    .record(started.elapsed());
                response.head.status
            }
            Err(err) => err.status().as_u16(),
        };
        self.gateway.stats.count(status);
        self.log_access(&exchange, status, started);
        match forwarded {
            Ok(response) => self.relay(response, &exchange).await,
            Err(err) => {
                // A body left unread in the connection ends it.
                let mut relay = exchange.relay;
                relay.keep_alive &= exchange.consumed;
                write_error(&mut self.scratch.out, &err, relay);
                let limit = self.gateway.config.send_timeout;
                send_to_client(&mut self.downstream.stream, &self.scratch.out, limit).await
                    && relay.keep_alive
            }
        }
    }

    /// Relays the response's head (written into `scratch.out`) and body; pools the
    /// upstream connection when it can carry another request. Returns whether the
    /// client connection stays open.
    async fn relay(&mut self, response: UpstreamResponse, exchange: &Exchange) -> bool {
        let UpstreamResponse {
            mut upstream,
            instance,
            head,
        } = response;
        let relayed = relay_body(
            &self.gateway,
            &mut self.downstream.stream,
            &self.scratch.out,
            &mut upstream,
            head.framing,
            exchange.relay,
        )
        .await;
        // A request body cut short by an early response leaves the connection
        // mid-request: it cannot carry another one.
        if relayed && head.keep_alive && exchange.consumed {
            self.gateway
                .upstreams
                .put(Target::of(&instance.url), upstream);
        }
        relayed && exchange.relay.keep_alive
    }

    /// Ships the access log line of `exchange` (time to the response head; bodies keep
    /// streaming after this).
    fn log_access(&self, exchange: &Exchange, status: u16, started: Instant) {
        let Some(access_log) = &self.gateway.access_log else {
            return;
        };
        access_log.ship(format!(
            "{} {} {status} {}us service={} instance={} id={:016x} peer={}",
            exchange.head.method,
            exchange.head.target.split('?').next().unwrap_or(""),
            started.elapsed().as_micros(),
            exchange.service.as_deref().unwrap_or("-"),
            exchange
                .instance
                .as_ref()
                .map_or("-", |instance| instance.url.as_str()),
            exchange.id,
            self.peer.ip(),
        ));
    }
}

/// `head` if it names its host once: HTTP/1.1 requires exactly one `Host` header, and
/// HTTP/1.0 allows at most one (RFC 9112 §3.2).
fn one_host(head: RequestHead) -> Result<RequestHead, GatewayError> {
    match head.hosts {
        0 if !head.http10 => Err(GatewayError::BadRequest(
            "no Host header: an HTTP/1.1 request must name its host".into(),
        )),
        0 | 1 => Ok(head),
        _ => Err(GatewayError::BadRequest("more than one Host header".into())),
    }
}

/// The error a client sees for a head the parser refused.
fn refused_head(err: HeadError) -> GatewayError {
    match err {
        HeadError::TooLarge(message) => GatewayError::HeadTooLarge(message),
        HeadError::Invalid(message) => GatewayError::BadRequest(message),
        HeadError::Unsupported(message) => GatewayError::NotImplemented(message),
    }
}

/// Writes `err` as the gateway's JSON error response into `out`.
fn write_error(out: &mut Vec<u8>, err: &GatewayError, relay: Relay) {
    let message = err.to_string();
    let body = ErrorBody::new(err.code(), &message).to_json();
    own_response(
        out,
        err.status(),
        "application/json",
        body.as_bytes(),
        relay,
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keel_registry::client::Discovery;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    use super::*;
    use crate::config::GatewayConfig;

    /// A connection served on an in-memory pipe; the other end is the client's. The
    /// gateway knows one instance of `svc` (on a port where nothing listens).
    fn connected(
        tune: impl FnOnce(&mut GatewayConfig),
    ) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let mut config = GatewayConfig::default();
        tune(&mut config);
        let discovery = Discovery::default();
        let instance = keel_registry::client::ServiceInstance {
            id: "127.0.0.1:9".into(),
            name: "svc".into(),
            url: "http://127.0.0.1:9".into(),
        };
        discovery.replace("svc", vec![instance]);
        let gateway = Arc::new(Gateway::new(config, discovery).unwrap());
        let (client, served) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let task = tokio::spawn(serve_connection(
            gateway,
            served,
            peer,
            CancellationToken::new(),
            keel_serve::Idle::unlimited(),
        ));
        (client, task)
    }

    async fn read_to_end(client: &mut DuplexStream) -> String {
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_nothing_should_be_closed_at_the_idle_timeout() {
        let started = tokio::time::Instant::now();
        let (mut client, task) = connected(|config| config.idle_timeout = Duration::from_secs(60));
        assert_eq!(read_to_end(&mut client).await, "", "closed without a word");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(60) && waited < Duration::from_secs(61),
            "{waited:?}"
        );
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_stops_arriving_should_get_408_at_the_header_timeout() {
        let started = tokio::time::Instant::now();
        let (mut client, task) =
            connected(|config| config.header_timeout = Duration::from_secs(30));
        client
            .write_all(b"GET /svc/x HTTP/1.1\r\nhost: t\r\n")
            .await
            .unwrap();
        let answer = read_to_end(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        assert!(
            answer.contains("head did not arrive within 30s"),
            "{answer}"
        );
        assert!(started.elapsed() >= Duration::from_secs(30));
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_trickled_a_byte_at_a_time_should_get_408_at_the_header_deadline() {
        let started = tokio::time::Instant::now();
        let (mut client, task) = connected(|config| {
            config.idle_timeout = Duration::from_secs(60);
            config.header_timeout = Duration::from_secs(10);
        });
        // One byte every 5 s: each read is well within the idle timeout.
        let trickle = tokio::spawn(async move {
            for byte in b"GET /svc/x HTTP/1.1\r\nhost: t\r\nx-pad: aaaaaaaaaaaaaaaaaaaa" {
                if client.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            client
        });
        let mut client = trickle.await.unwrap();
        let answer = read_to_end(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        let waited = started.elapsed();
        task.await.unwrap();
        // The trickle would take 250 s; the head's deadline ends it at 10 s, and the
        // trickler notices at its next write.
        assert!(
            waited <= Duration::from_secs(15),
            "the connection ended at the header deadline, not when the client gave up: {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_should_get_408_at_the_body_timeout() {
        let started = tokio::time::Instant::now();
        let (mut client, task) = connected(|config| config.body_timeout = Duration::from_secs(30));
        client
            .write_all(b"POST /svc/x HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nabc")
            .await
            .unwrap();
        let answer = read_to_end(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        assert!(
            answer.contains("body did not arrive within 30s"),
            "{answer}"
        );
        assert!(started.elapsed() >= Duration::from_secs(30));
        task.await.unwrap();
    }
}
