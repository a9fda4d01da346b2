//! A lean HTTP/1.1 client for upstreams: a pool of open connections per upstream
//! address, each used by one request at a time and returned to the pool when its
//! response body has ended.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// Idle connections kept per upstream at most.
const IDLE_PER_UPSTREAM: usize = 256;

/// Why a request did not get a response.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// No connection could be made: nothing was sent.
    Connect(io::Error),
    /// The request was (or may have been) sent, then the exchange failed.
    Sent(hyper::Error),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(err) => write!(f, "connect failed: {err}"),
            Self::Sent(err) => write!(f, "{err}"),
        }
    }
}

/// The pool.
#[derive(Debug)]
pub(crate) struct Upstreams {
    idle: Mutex<HashMap<String, Vec<SendRequest<Body>>>>,
    connect_timeout: Duration,
}

impl Upstreams {
    pub(crate) fn new(connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            idle: Mutex::default(),
            connect_timeout,
        })
    }

    fn pooled(&self, authority: &str) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let senders = idle.get_mut(authority)?;
        while let Some(sender) = senders.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn give_back(&self, authority: String, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let senders = idle.entry(authority).or_default();
        if senders.len() < IDLE_PER_UPSTREAM {
            senders.push(sender);
        }
    }

    async fn connect(&self, authority: &str) -> Result<SendRequest<Body>, UpstreamError> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(authority),
        )
        .await
        .map_err(|_| {
            UpstreamError::Connect(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
        })?
        .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|err| UpstreamError::Connect(io::Error::other(err)))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// Sends `request` to `authority` (`host:port`). A pooled connection that turns out
    /// closed before the request was written is replaced by a fresh one, and the
    /// request sent again: that is not a failure after sending.
    pub(crate) async fn send(
        self: &Arc<Self>,
        authority: &str,
        mut request: hyper::Request<Body>,
    ) -> Result<hyper::Response<Body>, UpstreamError> {
        loop {
            let (mut sender, fresh) = match self.pooled(authority) {
                Some(sender) => (sender, false),
                None => (self.connect(authority).await?, true),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let body = Returning {
                        inner: body,
                        slot: Some((Arc::clone(self), authority.to_owned(), sender)),
                    };
                    return Ok(hyper::Response::from_parts(parts, Body::new(body.boxed())));
                }
                Err(mut failed) => match failed.take_message() {
                    // Not written: a stale pooled connection. Try again, once fresh.
                    Some(unsent) if !fresh => request = unsent,
                    _ => return Err(UpstreamError::Sent(failed.into_error())),
                },
            }
        }
    }
}

/// A response body that returns its connection to the pool when it has ended.
struct Returning {
    inner: Incoming,
    slot: Option<(Arc<Upstreams>, String, SendRequest<Body>)>,
}

impl Returning {
    fn release(&mut self) {
        if let Some((pool, authority, sender)) = self.slot.take() {
            pool.give_back(authority, sender);
        }
    }
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        // A body read to its end leaves the connection reusable; otherwise it closes.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}
