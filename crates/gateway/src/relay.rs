//! Moving bodies: a request body from the client to an instance, a response's body
//! from the instance to the client (re-framed for HTTP/1.0 clients), through
//! buffers of bounded size. Nothing here routes, picks or retries.

use std::future::Future;
use std::io::IoSlice;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::error::{Fault, GatewayError, UpstreamError};
use crate::gateway::Gateway;
use crate::http1::{Chunked, Framing, Piece, Relay};
use crate::upstream::Upstream;

/// Room kept free in a read buffer before reading into it.
const READ_ROOM: usize = 4 * 1024;

/// How much a buffer grows when it needs room: also the most a body moves at once.
const BODY_CHUNK: usize = 64 * 1024;

/// The client's side of a connection: its stream, and the bytes read from it and not
/// used yet.
pub(crate) struct Downstream<C> {
    pub(crate) stream: C,
    pub(crate) buf: BytesMut,
}

impl<C: AsyncRead + Unpin> Downstream<C> {
    /// Reads more of a request body, waiting at most `pause` for it: the bytes read, 0
    /// at the end of the stream.
    async fn read_body(&mut self, pause: Duration) -> Result<usize, GatewayError> {
        match tokio::time::timeout(pause, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(read)) => Ok(read),
            Ok(Err(err)) => Err(GatewayError::BadRequest(format!(
                "reading the request body failed: {err}"
            ))),
            Err(_) => Err(GatewayError::RequestTimeout {
                part: "body",
                after: pause,
            }),
        }
    }

    /// The next `len` bytes (a request body), the client pausing at most `pause`.
    pub(crate) async fn take(
        &mut self,
        len: usize,
        pause: Duration,
    ) -> Result<Bytes, GatewayError> {
        while self.buf.len() < len {
            self.buf.reserve(len - self.buf.len());
            if self.read_body(pause).await? == 0 {
                return Err(GatewayError::BadRequest(format!(
                    "the request body ended after {} of {len} bytes",
                    self.buf.len()
                )));
            }
        }
        Ok(self.buf.split_to(len).freeze())
    }
}

/// What `io` gives, or `None` when it takes longer than `limit`. The timer is armed
/// only when `io` does not complete at its first poll: most writes to a client go
/// straight into its socket buffer, and those pay for no timer.
pub(crate) async fn within<F: Future>(limit: Duration, io: F) -> Option<F::Output> {
    let mut io = std::pin::pin!(io);
    let first = std::future::poll_fn(|cx| Poll::Ready(io.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(out) => Some(out),
        Poll::Pending => tokio::time::timeout(limit, io).await.ok(),
    }
}

/// Writes all of `bytes` to a client, which has `limit` to take them: false when the
/// write fails or the client stops reading for that long.
pub(crate) async fn send_to_client<C>(client: &mut C, bytes: &[u8], limit: Duration) -> bool
where
    C: AsyncWrite + Unpin,
{
    matches!(within(limit, client.write_all(bytes)).await, Some(Ok(())))
}

/// Makes room to read into `buf`.
pub(crate) fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_ROOM {
        buf.reserve(BODY_CHUNK);
    }
}

/// How long each side of a body copy may pause: the client (`body_timeout`, its
/// fault) and the upstream (`request_timeout`, the instance's).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pauses {
    pub(crate) client: Duration,
    pub(crate) upstream: Duration,
}

/// Copies a request body of `framing` from the client (what its buffer holds first)
/// to the upstream, leaving in the buffer what follows the body.
pub(crate) async fn copy_request_body<C, U>(
    downstream: &mut Downstream<C>,
    framing: Framing,
    upstream: &mut U,
    pauses: Pauses,
) -> Result<(), Fault>
where
    C: AsyncRead + Unpin,
    U: AsyncWrite + Unpin,
{
    let mut left = match framing {
        Framing::Length(len) => len,
        Framing::Chunked => u64::MAX,
        Framing::Empty | Framing::UntilClose => return Ok(()),
    };
    let mut chunked = Chunked::default();
    loop {
        if downstream.buf.is_empty() {
            reserve(&mut downstream.buf);
            if downstream
                .read_body(pauses.client)
                .await
                .map_err(Fault::Downstream)?
                == 0
            {
                return Err(Fault::Downstream(GatewayError::BadRequest(
                    "the request body ended early".into(),
                )));
            }
        }
        let buf = &mut downstream.buf;
        let take = if framing == Framing::Chunked {
            body_extent(&mut chunked, buf).map_err(|err| {
                Fault::Downstream(GatewayError::BadRequest(format!(
                    "malformed chunked request body: {err}"
                )))
            })?
        } else {
            usize::try_from(left).unwrap_or(usize::MAX).min(buf.len())
        };
        tokio::time::timeout(pauses.upstream, upstream.write_all(&buf[..take]))
            .await
            .map_err(|_| UpstreamError::TimedOut)?
            .map_err(UpstreamError::SendBody)?;
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

/// Writes `first` and then `second`, in one system call when the socket takes both.
pub(crate) async fn write_both<W>(
    to: &mut W,
    mut first: &[u8],
    second: &[u8],
) -> std::io::Result<()>
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

/// Writes the response's head (in `client_head`) and relays its body from the upstream.
/// Returns whether the body went through whole (the upstream connection may then be
/// reused).
pub(crate) async fn relay_body<C>(
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
    let limit = gateway.config.send_timeout;
    if framing == Framing::Chunked && relay.http10 {
        return send_to_client(client, client_head, limit).await
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
            return head.is_empty() || send_to_client(client, head, limit).await;
        }
        if upstream.buf.is_empty() {
            if !head.is_empty() {
                if !send_to_client(client, head, limit).await {
                    return false;
                }
                head = &[];
            }
            match read_more(gateway, upstream).await {
                Some(0) => return framing == Framing::UntilClose,
                Some(_) => {}
                None => return false,
            }
        }
        let take = if framing == Framing::Chunked {
            match body_extent(&mut chunked, &upstream.buf) {
                Ok(take) => take,
                Err(err) => {
                    tracing::debug!(error = %err, "malformed chunked response");
                    return false;
                }
            }
        } else {
            usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(upstream.buf.len())
        };
        if !matches!(
            within(limit, write_both(client, head, &upstream.buf[..take])).await,
            Some(Ok(()))
        ) {
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
                if !send_to_client(client, &upstream.buf[..n], gateway.config.send_timeout).await {
                    return false;
                }
                upstream.buf.advance(n);
            }
            Ok(Some(Piece::Framing(n))) => upstream.buf.advance(n),
            Ok(Some(Piece::End(n))) => {
                upstream.buf.advance(n);
                return true;
            }
            Ok(None) => match read_more(gateway, upstream).await {
                Some(0) | None => return false,
                Some(_) => {}
            },
            Err(err) => {
                tracing::debug!(error = %err, "malformed chunked response");
                return false;
            }
        }
    }
}

/// Reads more of a response's body: `None` when the upstream fails or sends nothing
/// for the request timeout.
async fn read_more(gateway: &Gateway, upstream: &mut Upstream) -> Option<usize> {
    reserve(&mut upstream.buf);
    let read = upstream.stream.read_buf(&mut upstream.buf);
    tokio::time::timeout(gateway.config.request_timeout, read)
        .await
        .ok()?
        .ok()
}
