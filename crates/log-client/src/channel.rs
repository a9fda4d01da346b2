//! The client's transport: gRPC calls over one HTTP/2 connection, driven with `h2`
//! directly.
//!
//! A general-purpose channel puts a request queue and a connection-driver hop
//! between the caller and the socket, and writes a request's headers and its
//! message separately. Here the calling task opens the stream, queues the headers and
//! the whole message, and the connection task writes both with one syscall; the
//! answer wakes the caller straight from the connection task. For the log service's
//! small acknowledged appends that is most of the client's time per call.
//!
//! ```text
//!  caller ── send_request + send_data ──> h2 stream state ──> connection task ──> socket
//!  caller <──────────── response body (flow control released as read) <────────────┘
//! ```
//!
//! The client's unary calls go through [`Channel::unary`], which also skips the
//! generated client's generic body and codec layers: the request is encoded into one
//! buffer and the answer decoded as it arrives. Streaming calls and
//! [`crate::Client::grpc`] use the generated client over the same connection.
//!
//! A request body that is not complete when the call starts (a client stream) is
//! sent by a spawned task, which keeps at most one message queued past the peer's
//! flow-control window and stops when the server resets the stream.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::Uri;
use http_body::{Body, Frame};
use tonic::{Code, Status};

/// The receive window of each stream: enough to keep a consume stream's chunks
/// flowing without waiting on window updates (as hyper's default).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// The receive window of the whole connection.
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// The most request bytes queued past the peer's flow-control window.
const SEND_BUFFER: usize = 1024 * 1024;

/// Where a client connects: the `http://host:port` origin of each request, and the
/// `host:port` to dial.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) origin: Uri,
    pub(crate) authority: String,
    /// The host, as the server's certificate must name it.
    host: String,
    /// TLS as the address says (`https://`: yes, `http://`: no), or, for a bare
    /// `host:port`, as the credentials say.
    pub(crate) tls: Option<bool>,
}

impl Target {
    /// The absolute URI of a gRPC method, e.g. `/log.v1.Log/Produce`.
    pub(crate) fn uri(&self, path: &'static str) -> Uri {
        let mut parts = self.origin.clone().into_parts();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static(path));
        Uri::from_parts(parts).unwrap_or_else(|_| self.origin.clone())
    }

    /// Parses `host:port`, or an `http://host:port` or `https://host:port` URL (port
    /// 80 or 443 when none is given).
    pub(crate) fn parse(addr: &str) -> Result<Self, String> {
        let (url, tls) = match addr.split_once("://") {
            Some(("http", _)) => (addr.to_owned(), Some(false)),
            Some(("https", rest)) => (format!("http://{rest}"), Some(true)),
            Some(_) => return Err("only http:// and https:// are supported".to_owned()),
            None => (format!("http://{addr}"), None),
        };
        let uri: Uri = url.parse().map_err(|err| format!("{err}"))?;
        let authority = uri
            .authority()
            .ok_or_else(|| "no host given".to_owned())?
            .clone();
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(format!(
                "a log service address has no path (got {:?})",
                uri.path()
            ));
        }
        let port = authority
            .port_u16()
            .unwrap_or(if tls == Some(true) { 443 } else { 80 });
        let origin = Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query("/")
            .build()
            .map_err(|err| format!("{err}"))?;
        Ok(Self {
            origin,
            authority: format!("{}:{port}", authority.host()),
            host: authority.host().trim_matches(['[', ']']).to_owned(),
            tls,
        })
    }
}

/// What a client presents to the log service: a bearer token, for a service with
/// an ACL.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    authorization: Option<http::HeaderValue>,
    /// TLS: the CA to trust and, for mutual TLS, the client's certificate.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Credentials {
    /// Calls with `Authorization: Bearer <token>`.
    ///
    /// # Errors
    ///
    /// The token holds characters a header cannot.
    pub fn bearer(token: &str) -> Result<Self, String> {
        let mut value: http::HeaderValue = format!("Bearer {token}")
            .parse()
            .map_err(|_| "a token holds only printable ASCII".to_owned())?;
        value.set_sensitive(true);
        Ok(Self {
            authorization: Some(value),
            tls: None,
        })
    }

    /// Connects with TLS, as `config` says (its ALPN must offer `h2`): to `https://`
    /// addresses and to bare `host:port` ones.
    #[must_use]
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }
}

/// One HTTP/2 connection to a log service, as a gRPC transport. Clones share the
/// connection; calls on it are multiplexed.
#[derive(Clone)]
pub struct Channel {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    /// Sent with every call: the caller's `Authorization`.
    authorization: Option<http::HeaderValue>,
    /// Plaintext: a connection that dies at once is most likely at a TLS port.
    plain: bool,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// Dials `target` and does the HTTP/2 handshake, all within `timeout`.
    pub(crate) async fn connect(
        target: &Target,
        timeout: Duration,
        credentials: &Credentials,
    ) -> std::io::Result<Self> {
        let closed = Arc::new(AtomicBool::new(false));
        let connecting = async {
            let tcp = tokio::net::TcpStream::connect(&target.authority).await?;
            tcp.set_nodelay(true)?;
            let tls = match (target.tls, &credentials.tls) {
                (Some(false), _) | (None, None) => None,
                (_, Some(config)) => Some(Arc::clone(config)),
                (Some(true), None) => {
                    return Err(std::io::Error::other(
                        "an https:// address needs the CA to trust (--ca)",
                    ));
                }
            };
            match tls {
                None => handshake(tcp, &target.authority, &closed)
                    .await
                    .map(|send| (send, true)),
                Some(config) => {
                    let name = rustls_pki_types::ServerName::try_from(target.host.clone())
                        .map_err(std::io::Error::other)?;
                    let stream = tokio_rustls::TlsConnector::from(config)
                        .connect(name, tcp)
                        .await?;
                    handshake(stream, &target.authority, &closed)
                        .await
                        .map(|send| (send, false))
                }
            }
        };
        let (send, plain) = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no HTTP/2 connection within {timeout:?}"),
                )
            })??;
        Ok(Self {
            send,
            closed,
            authorization: credentials.authorization.clone(),
            plain,
        })
    }

    /// Whether the connection has ended; calls on it fail with `UNAVAILABLE`.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// The HTTP/2 handshake on `io`; the connection is driven by a task of its own,
/// which sets `closed` when it ends.
async fn handshake<IO>(
    io: IO,
    authority: &str,
    closed: &Arc<AtomicBool>,
) -> std::io::Result<SendRequest<Bytes>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(SEND_BUFFER)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(std::io::Error::other)?;
    let flag = Arc::clone(closed);
    let authority = authority.to_owned();
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(%authority, error = %err, "log service connection ended");
        }
        flag.store(true, Ordering::Release);
    });
    Ok(send)
}

/// The longest unary response accepted: a consume answer carries at most one record,
/// and records are far smaller than this.
const MAX_UNARY_RESPONSE: usize = 256 * 1024 * 1024;

impl Channel {
    /// Makes a unary call: one message each way, then the status in the trailers.
    /// It does what the generated client does for a unary call, without its generic
    /// body, codec and buffering layers: one request buffer, sent with the headers;
    /// the answer is decoded as it arrives.
    pub(crate) async fn unary<Req, Resp>(
        &mut self,
        target: &Target,
        path: &'static str,
        request: &Req,
    ) -> Result<Resp, Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let len = request.encoded_len();
        let mut message = bytes::BytesMut::with_capacity(5 + len);
        message.extend_from_slice(&[0]);
        message.extend_from_slice(
            &u32::try_from(len)
                .map_err(|_| too_large(len))?
                .to_be_bytes(),
        );
        request
            .encode(&mut message)
            .map_err(|err| Status::internal(format!("encoding the request: {err}")))?;
        let mut head = http::Request::post(target.uri(path))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(())
            .map_err(|err| Status::internal(format!("building the request: {err}")))?;
        if let Some(authorization) = &self.authorization {
            head.headers_mut()
                .insert(http::header::AUTHORIZATION, authorization.clone());
        }
        poll_fn(|cx| self.send.poll_ready(cx))
            .await
            .map_err(|err| status_on(&err, self.plain))?;
        let (response, mut stream) = self
            .send
            .send_request(head, false)
            .map_err(|err| status_on(&err, self.plain))?;
        stream
            .send_data(message.freeze(), true)
            .map_err(|err| status_on(&err, self.plain))?;
        let response = response.await.map_err(|err| status_on(&err, self.plain))?;
        let http_status = response.status();
        // Trailers-only: an error answered with headers alone.
        if let Some(status) = grpc_status(response.headers()) {
            return Err(if status.code() == Code::Ok {
                Status::internal("the service ended the call without a response message")
            } else {
                status
            });
        }
        let mut body = ResponseBody::new(response.into_body());
        let mut received = bytes::BytesMut::new();
        let mut trailers = None;
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            match frame?.into_data() {
                Ok(chunk) => {
                    if received.len() + chunk.len() > MAX_UNARY_RESPONSE + 5 {
                        return Err(too_large(received.len() + chunk.len()));
                    }
                    received.extend_from_slice(&chunk);
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        match trailers.as_ref().and_then(grpc_status) {
            Some(status) if status.code() == Code::Ok => decode_message(&received),
            Some(status) => Err(status),
            None => Err(Status::new(
                code_of_http_status(http_status),
                format!("the service answered HTTP {http_status} without a gRPC status"),
            )),
        }
    }
}

/// The gRPC status a response's headers or trailers carry, if any. tonic's parser
/// panics on a `grpc-status-details-bin` that is not base64; such details, which this
/// client does not use, are dropped first.
fn grpc_status(headers: &http::HeaderMap) -> Option<Status> {
    use base64::Engine as _;
    const DETAILS: &str = "grpc-status-details-bin";
    match headers.get(DETAILS) {
        Some(details)
            if base64::engine::general_purpose::STANDARD
                .decode(details.as_bytes())
                .is_err() =>
        {
            let mut headers = headers.clone();
            headers.remove(DETAILS);
            Status::from_header_map(&headers)
        }
        _ => Status::from_header_map(headers),
    }
}

fn too_large(len: usize) -> Status {
    Status::resource_exhausted(format!(
        "a message of {len} bytes is over the client's limit"
    ))
}

/// The one length-prefixed, uncompressed message of a unary response.
fn decode_message<Resp: prost::Message + Default>(received: &[u8]) -> Result<Resp, Status> {
    let malformed =
        |what: &str| Status::internal(format!("malformed response from the service: {what}"));
    let (prefix, message) = received
        .split_first_chunk::<5>()
        .ok_or_else(|| malformed("no message"))?;
    if prefix[0] != 0 {
        return Err(malformed("a compressed message, which was not asked for"));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if message.len() != len {
        return Err(malformed("the message length does not match its prefix"));
    }
    Resp::decode(message).map_err(|err| malformed(&err.to_string()))
}

/// The gRPC code for an HTTP status that came without a gRPC status (a proxy's
/// error page, say), as gRPC's HTTP mapping gives it.
fn code_of_http_status(http_status: http::StatusCode) -> Code {
    match http_status {
        http::StatusCode::BAD_REQUEST => Code::Internal,
        http::StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        http::StatusCode::FORBIDDEN => Code::PermissionDenied,
        http::StatusCode::NOT_FOUND => Code::Unimplemented,
        http::StatusCode::TOO_MANY_REQUESTS
        | http::StatusCode::BAD_GATEWAY
        | http::StatusCode::SERVICE_UNAVAILABLE
        | http::StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// What a failed call reports; on a plaintext connection that ended (not a stream
/// refused), with the likeliest cause.
fn status_on(err: &h2::Error, plain: bool) -> Status {
    let status = status(err);
    if plain && err.reason().is_none() {
        return Status::new(
            status.code(),
            format!(
                "{} (if the service serves TLS, connect with --ca, or to an https:// address)",
                status.message()
            ),
        );
    }
    status
}

/// What a call on a broken connection or stream reports.
fn status(err: &h2::Error) -> Status {
    let code = match err.reason() {
        _ if err.is_io() || err.is_go_away() => Code::Unavailable,
        Some(Reason::REFUSED_STREAM) => Code::Unavailable,
        Some(Reason::CANCEL) => Code::Cancelled,
        Some(Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
        _ => Code::Internal,
    };
    Status::new(code, format!("log service connection: {err}"))
}

type Pending = Pin<Box<dyn Future<Output = Result<http::Response<ResponseBody>, Status>> + Send>>;

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<ResponseBody>;
    type Error = Status;
    type Future = Pending;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        let plain = self.plain;
        self.send
            .poll_ready(cx)
            .map_err(|err| status_on(&err, plain))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Pending {
        let (mut head, body) = request.into_parts();
        if let Some(authorization) = &self.authorization {
            head.headers
                .insert(http::header::AUTHORIZATION, authorization.clone());
        }
        let complete = body.is_end_stream();
        let plain = self.plain;
        let opened = self
            .send
            .send_request(http::Request::from_parts(head, ()), complete);
        Box::pin(async move {
            let (response, stream) = opened.map_err(|err| status_on(&err, plain))?;
            if !complete {
                // A unary message is ready at once: queue it now, so that it leaves
                // with the headers. Only a body still being produced gets a task.
                let mut sending = Box::pin(send_body(body, stream));
                if (&mut sending).now_or_never().is_none() {
                    tokio::spawn(sending);
                }
            }
            let response = response.await.map_err(|err| status_on(&err, plain))?;
            Ok(response.map(ResponseBody::new))
        })
    }
}

/// Sends a request body on its stream, within the peer's flow-control window.
async fn send_body(mut body: tonic::body::Body, mut stream: SendStream<Bytes>) {
    if let Err(err) = pump(&mut body, &mut stream).await {
        tracing::debug!(error = %err, "sending a request body failed");
        stream.send_reset(Reason::CANCEL);
    }
}

async fn pump(
    body: &mut tonic::body::Body,
    stream: &mut SendStream<Bytes>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut first = true;
    loop {
        let next = poll_fn(|cx| {
            // The server may end the call before the body does (an error status).
            if let Poll::Ready(reset) = stream.poll_reset(cx) {
                return Poll::Ready(Err(reset));
            }
            Pin::new(&mut *body).poll_frame(cx).map(Ok)
        })
        .await;
        let frame = match next {
            // The server is done with the stream: nothing more to send.
            Err(_) => return Ok(()),
            Ok(None) => {
                stream.send_data(Bytes::new(), true)?;
                return Ok(());
            }
            Ok(Some(Err(status))) => return Err(status.into()),
            Ok(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                // The first message goes out with the headers, before the connection
                // has granted the new stream any window; each later one waits until
                // the one before it is within the window, so at most one is queued.
                if !first {
                    wait_for_capacity(stream, data.len()).await?;
                }
                first = false;
                stream.send_data(data, false)?;
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.send_trailers(trailers)?;
                    return Ok(());
                }
            }
        }
    }
}

/// Waits until everything queued on the stream is within the peer's window and more
/// may be sent; asks for `wanted` bytes more.
async fn wait_for_capacity(stream: &mut SendStream<Bytes>, wanted: usize) -> Result<(), h2::Error> {
    stream.reserve_capacity(wanted);
    while stream.capacity() == 0 {
        match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(err),
            None => return Err(h2::Error::from(Reason::STREAM_CLOSED)),
        }
    }
    Ok(())
}

/// A response body read from its HTTP/2 stream: data frames, then trailers (where
/// gRPC puts the status). Each data frame's bytes go back to the sender's window as
/// soon as they are handed on.
pub struct ResponseBody {
    recv: RecvStream,
    state: BodyState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Data,
    Trailers,
    Done,
}

impl ResponseBody {
    fn new(recv: RecvStream) -> Self {
        Self {
            recv,
            state: BodyState::Data,
        }
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.state == BodyState::Data {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Failing to release only means the stream is gone, which the
                    // next poll reports.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) => {
                    this.state = BodyState::Done;
                    return Poll::Ready(Some(Err(status(&err))));
                }
                None => this.state = BodyState::Trailers,
            }
        }
        if this.state == BodyState::Done {
            return Poll::Ready(None);
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.state = BodyState::Done;
        Poll::Ready(match trailers {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(err) => Some(Err(status(&err))),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.state == BodyState::Done
    }
}

#[cfg(test)]
#[path = "channel_tests.rs"]
mod tests;
