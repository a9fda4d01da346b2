//! Forwarding one request: route it, read a body small enough to send again, pick an
//! instance, send, read the response's head; on failure, record it against the instance
//! and try another while that is safe.

use std::future::Future;
use std::sync::Arc;

use bytes::{Buf as _, Bytes};
use http::Method;
use keel_registry::client::ServiceInstance;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::time::Instant;

use crate::connection::{ClientConnection, Exchange, Payload, UpstreamResponse};
use crate::error::{Fault, GatewayError, UpstreamError};
use crate::forwarded::BodyFraming;
use crate::http1::{Framing, HeadError, Relay, RequestHead, ResponseHead, parse_response};
use crate::relay::{Downstream, Pauses, copy_request_body, reserve, write_both};
use crate::route::{Route, split_url};
use crate::upstream::{Target, Upstream};

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    )
}

impl<C> ClientConnection<C>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    /// Routes the request, sends it to an instance (retrying as the config allows), and
    /// reads the response's head.
    pub(crate) async fn forward(
        &mut self,
        exchange: &mut Exchange,
    ) -> Result<UpstreamResponse, GatewayError> {
        let route = Route::parse(&exchange.head.target, &self.gateway.config.strip_prefix)?;
        let forwarded = self.forward_routed(exchange, &route).await;
        exchange.service = Some(route.service);
        forwarded
    }

    /// [`ClientConnection::forward`] once the request is routed.
    async fn forward_routed(
        &mut self,
        exchange: &mut Exchange,
        route: &Route,
    ) -> Result<UpstreamResponse, GatewayError> {
        // The first choice, before the body is read: no instance at all is a 404 or a 503.
        // A gateway that has not heard from the registry yet (it just started) cannot
        // tell: the request waits for the registry's table, a little.
        let mut first = self.gateway.pick(&route.service, &[]);
        if first.is_none() && self.gateway.wait_for_table().await {
            first = self.gateway.pick(&route.service, &[]);
        }
        let Some(first) = first else {
            return Err(self.gateway.no_instance(&route.service));
        };
        self.read_payload(exchange).await?;
        let buffered = match &exchange.payload {
            Payload::Buffered(body) => Some(body.len()),
            Payload::Streaming => None,
        };
        self.scratch.forwarded.complete(
            (self.peer.ip(), self.gateway.config.tls.is_some()),
            exchange.id,
            route,
            BodyFraming::of(exchange.head.framing, buffered),
        );

        let idempotent = is_idempotent(&exchange.head.method);
        // Instances that failed this request; empty unless it is retried.
        let mut tried: Vec<String> = Vec::new();
        let mut last_failure = None;
        let mut next = Some(first);
        for attempt in 0..=self.gateway.config.retries {
            let Some(picked) = next
                .take()
                .or_else(|| self.gateway.pick(&route.service, &tried))
            else {
                break;
            };
            let instance = Arc::clone(&picked.instance);
            exchange.instance = Some(Arc::clone(&instance));
            if attempt > 0 {
                self.gateway
                    .stats
                    .retries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            match self.attempt(exchange, route, &instance).await {
                Ok((upstream, head)) => {
                    self.gateway.ejections.record(&instance.url, true);
                    // The picked guard (in-flight count) lives until the head is back.
                    drop(picked);
                    return Ok(UpstreamResponse {
                        upstream,
                        instance,
                        head,
                    });
                }
                Err(err) => {
                    if err.blames_instance() {
                        self.gateway.ejections.record(&instance.url, false);
                    }
                    let retry = matches!(exchange.payload, Payload::Buffered(_))
                        && err.retry_safe(idempotent);
                    tracing::debug!(url = instance.url, error = %err, retry, "upstream failed");
                    if !retry {
                        return Err(err);
                    }
                    tried.push(instance.url.clone());
                    last_failure = Some(err);
                }
            }
        }
        Err(
            last_failure.unwrap_or_else(|| GatewayError::NoHealthyInstance {
                service: route.service.clone(),
            }),
        )
    }

    /// Reads a body small enough to be sent again whole; a larger one streams once.
    async fn read_payload(&mut self, exchange: &mut Exchange) -> Result<(), GatewayError> {
        exchange.payload = match exchange.head.framing {
            Framing::Empty => Payload::Buffered(Bytes::new()),
            Framing::Length(len) if len <= self.gateway.config.retry_body_bytes => {
                continue_if_expected(&mut self.downstream.stream, &exchange.head).await?;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                let pause = self.gateway.config.body_timeout;
                let body = self.downstream.take(len, pause).await?;
                exchange.consumed = true;
                Payload::Buffered(body)
            }
            Framing::Length(_) | Framing::Chunked | Framing::UntilClose => Payload::Streaming,
        };
        Ok(())
    }

    /// One attempt on `instance`. The instance has the request timeout to read the
    /// request and respond; a client that is slow to send its body is the client's
    /// failure (408), never the instance's.
    async fn attempt(
        &mut self,
        exchange: &mut Exchange,
        route: &Route,
        instance: &ServiceInstance,
    ) -> Result<(Upstream, ResponseHead), GatewayError> {
        let url = instance.url.as_str();
        let (authority, base_path) = split_url(url);
        self.scratch.forwarded.write_head(
            &exchange.head,
            route,
            (authority, base_path),
            &mut self.scratch.upstream_head,
        );
        match self.send(Target::of(url), exchange).await {
            Ok(responded) => Ok(responded),
            Err(Fault::Downstream(err)) => {
                exchange.relay.keep_alive = false;
                Err(err)
            }
            Err(Fault::Upstream(UpstreamError::TimedOut)) => Err(GatewayError::UpstreamTimeout {
                url: url.to_owned(),
                service: route.service.clone(),
                after: self.gateway.config.request_timeout,
            }),
            Err(Fault::Upstream(source)) => Err(GatewayError::Upstream {
                url: url.to_owned(),
                service: route.service.clone(),
                source,
            }),
        }
    }

    /// Sends the request (its head in `scratch.upstream_head`) to `authority` and reads
    /// the response's head. A pooled connection that the upstream closed under us, before
    /// any response, is replaced by a new one for a request that may be sent twice.
    ///
    /// The instance has the request timeout to take a buffered request and respond; a
    /// streamed body gives it the request timeout for each write, and again for the
    /// response once the body is sent, while the client has the body timeout for each
    /// read.
    async fn send(
        &mut self,
        target: Target<'_>,
        exchange: &mut Exchange,
    ) -> Result<(Upstream, ResponseHead), Fault> {
        let request_head = &self.scratch.upstream_head;
        let upstreams = &self.gateway.upstreams;
        let pauses = Pauses {
            client: self.gateway.config.body_timeout,
            upstream: self.gateway.config.request_timeout,
        };
        let mut upstream = upstreams
            .get(target)
            .await
            .map_err(UpstreamError::Connect)?;
        loop {
            let deadline = Instant::now() + pauses.upstream;
            let sent = match &exchange.payload {
                Payload::Buffered(body) => by(deadline, async {
                    write_both(&mut upstream.stream, request_head, body)
                        .await
                        .map_err(UpstreamError::Send)
                })
                .await
                .map_err(Fault::Upstream),
                Payload::Streaming => send_streaming(
                    &mut self.downstream,
                    &exchange.head,
                    &mut upstream,
                    request_head,
                    pauses,
                )
                .await
                .map(|whole| {
                    exchange.consumed = whole;
                    // A response before the whole body: the rest stays unread.
                    exchange.relay.keep_alive &= whole;
                }),
            };
            let deadline = match exchange.payload {
                Payload::Buffered(_) => deadline,
                Payload::Streaming => Instant::now() + pauses.upstream,
            };
            let responded = match sent {
                Ok(()) => by(
                    deadline,
                    read_response_head(
                        &mut upstream,
                        &exchange.head.method,
                        &mut exchange.relay,
                        &mut self.scratch.out,
                    ),
                )
                .await
                .map_err(Fault::Upstream),
                Err(err) => Err(err),
            };
            match responded {
                Ok(response) => return Ok((upstream, response)),
                Err(Fault::Upstream(ref err))
                    if !matches!(err, UpstreamError::TimedOut)
                        && upstream.reused
                        && upstream.buf.is_empty()
                        && matches!(exchange.payload, Payload::Buffered(_))
                        && is_idempotent(&exchange.head.method) =>
                {
                    upstream = upstreams
                        .connect(target)
                        .await
                        .map_err(UpstreamError::Connect)?;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// What `io` gives if it completes by `deadline`, else [`UpstreamError::TimedOut`].
async fn by<T>(
    deadline: Instant,
    io: impl Future<Output = Result<T, UpstreamError>>,
) -> Result<T, UpstreamError> {
    tokio::time::timeout_at(deadline, io)
        .await
        .unwrap_or(Err(UpstreamError::TimedOut))
}

/// Answers `100 Continue` to a client that waits for it before sending its body.
async fn continue_if_expected<C>(client: &mut C, head: &RequestHead) -> Result<(), GatewayError>
where
    C: AsyncWrite + Unpin,
{
    if head.expect_continue && !head.http10 {
        client
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|err| {
                GatewayError::BadRequest(format!("the client connection failed: {err}"))
            })?;
    }
    Ok(())
}

/// Sends the request head, then the body as it streams from the client. Returns
/// whether the whole body went out: the upstream may answer before reading it all,
/// and then the rest is not sent.
async fn send_streaming<C>(
    downstream: &mut Downstream<C>,
    head: &RequestHead,
    upstream: &mut Upstream,
    request_head: &[u8],
    pauses: Pauses,
) -> Result<bool, Fault>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut from_upstream, mut to_upstream) = upstream.stream.split();
    tokio::time::timeout(pauses.upstream, to_upstream.write_all(request_head))
        .await
        .map_err(|_| UpstreamError::TimedOut)?
        .map_err(UpstreamError::Send)?;
    continue_if_expected(&mut downstream.stream, head)
        .await
        .map_err(Fault::Downstream)?;
    let copy = copy_request_body(downstream, head.framing, &mut to_upstream, pauses);
    tokio::pin!(copy);
    reserve(&mut upstream.buf);
    tokio::select! {
        biased;
        copied = &mut copy => copied.map(|()| true),
        early = from_upstream.read_buf(&mut upstream.buf) => match early {
            Ok(0) => Err(UpstreamError::ClosedDuringBody.into()),
            Ok(_) => Ok(false),
            Err(err) => Err(UpstreamError::Read(err).into()),
        },
    }
}

/// Reads the response's head (past any interim 1xx responses) and writes the client's.
async fn read_response_head(
    upstream: &mut Upstream,
    method: &Method,
    relay: &mut Relay,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, UpstreamError> {
    loop {
        if !upstream.buf.is_empty() {
            match parse_response(&upstream.buf, method, relay, out) {
                Ok(Some(response)) => {
                    upstream.buf.advance(response.len);
                    match response.status {
                        101 => return Err(UpstreamError::SwitchedProtocols),
                        100..=199 => continue,
                        _ => return Ok(response),
                    }
                }
                Ok(None) => {}
                Err(
                    HeadError::Invalid(message)
                    | HeadError::TooLarge(message)
                    | HeadError::Unsupported(message),
                ) => return Err(UpstreamError::MalformedResponse(message)),
            }
        }
        reserve(&mut upstream.buf);
        match upstream.stream.read_buf(&mut upstream.buf).await {
            Ok(0) => return Err(UpstreamError::ClosedBeforeResponse),
            Ok(_) => {}
            Err(err) => return Err(UpstreamError::Read(err)),
        }
    }
}
