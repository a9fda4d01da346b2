//! Connections to upstreams: each serving thread keeps a pool of open HTTP/1.1
//! connections per upstream address (plain and TLS apart). A connection serves one
//! exchange at a time, on the task of the client request it carries, and goes back
//! to the pool when the response has been read whole. An `https` instance is reached
//! over TLS (rustls), its certificate verified against the gateway's CA
//! (`client_tls`) or else the platform's roots.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

/// Idle connections kept per upstream at most.
const IDLE_PER_UPSTREAM: usize = 256;

/// Buffer space an upstream connection starts with (response heads fit in it).
pub(crate) const READ_BUFFER: usize = 8 * 1024;

/// The TLS of `https` upstreams (HTTP/1.1): trusting the CA of `files` (and
/// presenting its client certificate) when given, else the platform's roots.
///
/// # Errors
///
/// A file cannot be used.
pub(crate) fn tls_config(
    files: Option<&keel_serve::tls::ClientTlsFiles>,
) -> Result<Arc<rustls::ClientConfig>, keel_serve::tls::TlsError> {
    const ALPN: &[u8] = b"http/1.1";
    let config = match files {
        Some(files) => keel_serve::tls::client_config(files, &[ALPN])?,
        None => keel_serve::client::platform_config(&[ALPN])?,
    };
    Ok(config)
}

/// Where a connection goes: `host:port`, and whether it speaks TLS (`https`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) authority: &'a str,
    pub(crate) tls: bool,
}

impl<'a> Target<'a> {
    /// The target of an instance's URL (`http://host:port/...` or `https://...`).
    pub(crate) fn of(url: &'a str) -> Self {
        Self {
            authority: crate::route::split_url(url).0,
            tls: url.starts_with("https://"),
        }
    }
}

/// A connection to an upstream: plain TCP, or TLS over it.
#[derive(Debug)]
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// Its read and write halves, to use at once (a response may start while the
    /// request body is still going out).
    pub(crate) fn split(&mut self) -> (impl AsyncRead + Unpin + '_, impl AsyncWrite + Unpin + '_) {
        match self {
            Self::Plain(stream) => {
                let (read, write) = stream.split();
                (Either::Left(read), Either::Left(write))
            }
            Self::Tls(stream) => {
                let (read, write) = tokio::io::split(stream.as_mut());
                (Either::Right(read), Either::Right(write))
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(stream) => stream.is_write_vectored(),
            Self::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An open connection to an upstream, with the bytes read from it and not used yet.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) stream: Stream,
    pub(crate) buf: BytesMut,
    /// Taken from the pool (it served an exchange before).
    pub(crate) reused: bool,
}

/// The pool of one serving thread.
#[derive(Debug)]
pub(crate) struct Upstreams {
    /// Idle connections by authority: plain, then TLS.
    idle: Mutex<[HashMap<String, Vec<Upstream>>; 2]>,
    connect_timeout: Duration,
    tls: Arc<rustls::ClientConfig>,
}

impl Upstreams {
    pub(crate) fn new(connect_timeout: Duration, tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            idle: Mutex::default(),
            connect_timeout,
            tls,
        }
    }

    /// An open connection to `target`: an idle one from the pool if there is one
    /// still open, else a new one.
    ///
    /// # Errors
    ///
    /// Connecting (or the TLS handshake) failed or took longer than the connect
    /// timeout: nothing was sent.
    pub(crate) async fn get(&self, target: Target<'_>) -> io::Result<Upstream> {
        if let Some(pooled) = self.pooled(target) {
            return Ok(pooled);
        }
        self.connect(target).await
    }

    /// A new connection to `target`.
    ///
    /// # Errors
    ///
    /// As [`Upstreams::get`].
    pub(crate) async fn connect(&self, target: Target<'_>) -> io::Result<Upstream> {
        let connecting = async {
            let stream = TcpStream::connect(target.authority).await?;
            let _ = stream.set_nodelay(true);
            if !target.tls {
                return Ok::<_, io::Error>(Stream::Plain(stream));
            }
            let host = match target.authority.rsplit_once(':') {
                Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
                None => target.authority,
            };
            let name = ServerName::try_from(host.to_owned()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{host:?} is not a name a certificate can be checked for"),
                )
            })?;
            let stream = TlsConnector::from(Arc::clone(&self.tls))
                .connect(name, stream)
                .await?;
            Ok(Stream::Tls(Box::new(stream)))
        };
        let stream = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect timed out after {:?}", self.connect_timeout),
                )
            })??;
        Ok(Upstream {
            stream,
            buf: BytesMut::with_capacity(READ_BUFFER),
            reused: false,
        })
    }

    fn pooled(&self, target: Target<'_>) -> Option<Upstream> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let connections = idle[usize::from(target.tls)].get_mut(target.authority)?;
        while let Some(mut upstream) = connections.pop() {
            if still_open(&mut upstream.stream) {
                upstream.reused = true;
                return Some(upstream);
            }
        }
        None
    }

    /// Returns a connection whose last response was read whole and that the upstream
    /// keeps open.
    pub(crate) fn put(&self, target: Target<'_>, upstream: Upstream) {
        if !upstream.buf.is_empty() {
            // Bytes after the response: the upstream does not speak HTTP/1.1 properly.
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let idle = &mut idle[usize::from(target.tls)];
        match idle.get_mut(target.authority) {
            Some(connections) if connections.len() < IDLE_PER_UPSTREAM => {
                connections.push(upstream);
            }
            Some(_) => {}
            None => {
                idle.insert(target.authority.to_owned(), vec![upstream]);
            }
        }
    }
}

/// Whether an idle connection is still open: nothing to read on it (an upstream that
/// closed it left an end of stream there). Costs no system call unless the connection
/// became readable while idle. On a TLS connection, what arrived is read through TLS:
/// a record with nothing for the application (a session ticket) leaves it open; a
/// closure alert, an end of stream or stray bytes do not.
fn still_open(stream: &mut Stream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match stream {
        Stream::Plain(tcp) => match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: closed, or readiness left from the last read. Look.
            Poll::Ready(Ok(())) => matches!(
                tcp.try_read(&mut [0u8; 1]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock
            ),
        },
        Stream::Tls(tls) => {
            let mut byte = [0u8; 1];
            match tls
                .get_ref()
                .0
                .poll_peek(&mut cx, &mut ReadBuf::new(&mut byte))
            {
                Poll::Pending => true,
                Poll::Ready(Ok(0) | Err(_)) => false,
                Poll::Ready(Ok(_)) => Pin::new(tls.as_mut())
                    .poll_read(&mut cx, &mut ReadBuf::new(&mut byte))
                    .is_pending(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn plain(authority: &str) -> Target<'_> {
        Target {
            authority,
            tls: false,
        }
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_by_its_upstream_should_not_be_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let pool = Upstreams::new(Duration::from_secs(1), tls_config(None).unwrap());

        let open = pool.get(plain(&authority)).await.unwrap();
        let (mut kept, _) = listener.accept().await.unwrap();
        let closing = pool.connect(plain(&authority)).await.unwrap();
        let (closed, _) = listener.accept().await.unwrap();
        pool.put(plain(&authority), open);
        pool.put(plain(&authority), closing);
        drop(closed);
        // The close reaches the pooled connection; wait for it with a deadline.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let readable = pool.idle.lock().unwrap()[0][&authority].iter().any(|u| {
                let mut cx = Context::from_waker(Waker::noop());
                matches!(&u.stream, Stream::Plain(tcp) if tcp.poll_read_ready(&mut cx).is_ready())
            });
            if readable || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // The closed one is skipped; the open one is found and marked reused.
        let mut reused = pool.get(plain(&authority)).await.unwrap();
        assert!(reused.reused);
        reused.stream.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        kept.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        assert!(pool.idle.lock().unwrap()[0][&authority].is_empty());
    }

    #[tokio::test]
    async fn a_connection_with_unread_bytes_should_not_go_back_to_the_pool() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let pool = Upstreams::new(Duration::from_secs(1), tls_config(None).unwrap());
        let mut upstream = pool.get(plain(&authority)).await.unwrap();
        upstream.buf.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        pool.put(plain(&authority), upstream);
        assert!(!pool.idle.lock().unwrap()[0].contains_key(&authority));
    }
}
