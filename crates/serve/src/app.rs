//! Serving an axum app on a listener with the limits a server facing the network
//! needs, which `axum::serve` does not set: a deadline for each request head (hyper's
//! `header_read_timeout`, which needs a timer), the same deadline for a connection's
//! first byte (hyper waits for it without one, to tell HTTP/1.1 from HTTP/2) and,
//! optionally, a cap on open connections. HTTP/1.1 and HTTP/2 (gRPC) share the
//! listener. With TLS, each connection's handshake runs on its own task under the
//! same deadline, and a verified client certificate's principal is set on every
//! request of the connection ([`crate::tls::PeerPrincipal`]).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tls::PeerPrincipal;

/// The limits [`serve_app`] applies to each connection, and its TLS.
#[derive(Debug, Clone)]
pub struct AppLimits {
    /// How long an HTTP/1.1 request head may take to arrive before the connection is
    /// closed: a client that opens connections and sends half a head cannot hold them.
    pub header_timeout: Duration,
    /// Connections open at once; past it, the next waits in the accept backlog until
    /// one closes. `None`: no limit (the listener may have one of its own, as
    /// [`crate::serve`] does).
    pub max_connections: Option<usize>,
    /// Speak TLS only, with this config (see [`crate::tls::server_config`]).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Serves `app` on the connections `listener` yields until `stop` is cancelled; then
/// stops accepting, lets every connection finish the request under way (HTTP/1.1) or
/// its streams (HTTP/2, after a GOAWAY), and returns once all have closed.
pub async fn serve_app<L>(mut listener: L, app: Router, limits: AppLimits, stop: CancellationToken)
where
    L: Listener,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let slots = limits
        .max_connections
        .map(|max| Arc::new(Semaphore::new(max)));
    let connections = TaskTracker::new();
    loop {
        let slot = match &slots {
            Some(slots) => tokio::select! {
                biased;
                () = stop.cancelled() => break,
                slot = Arc::clone(slots).acquire_owned() => match slot {
                    Ok(slot) => Some(slot),
                    Err(_) => break,
                },
            },
            None => None,
        };
        let (io, _peer) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let app = app.clone();
        let served = Served {
            builder: builder.clone(),
            stop: stop.clone(),
            header_timeout: limits.header_timeout,
        };
        let tls = limits.tls.clone();
        connections.spawn(async move {
            match tls {
                None => served.run(io, app).await,
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    let handshake =
                        tokio::time::timeout(served.header_timeout, acceptor.accept(io)).await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            let peer = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(<[_]>::first)
                                .and_then(crate::tls::principal_of);
                            match peer {
                                Some(name) => {
                                    let peer = PeerPrincipal(Arc::from(name));
                                    served.run(stream, app.layer(axum::Extension(peer))).await;
                                }
                                None => served.run(stream, app).await,
                            }
                        }
                        Ok(Err(err)) => tracing::debug!(error = %err, "TLS handshake failed"),
                        Err(_) => {
                            tracing::debug!("TLS handshake not done within the header deadline")
                        }
                    }
                }
            }
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
}

/// What serving one connection needs besides the connection and the app.
struct Served {
    builder: auto::Builder<TokioExecutor>,
    stop: CancellationToken,
    header_timeout: Duration,
}

impl Served {
    /// Serves `app` on `io` until the client closes, stays silent past the header
    /// deadline, or shutdown asks it to finish what is under way.
    async fn run<IO>(self, io: IO, app: Router)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (io, heard) = Heard::new(io);
        let service = TowerToHyperService::new(app);
        let connection = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        let mut connection = std::pin::pin!(connection);
        // A client that sends nothing at all is dropped at the header deadline.
        let header_timeout = self.header_timeout;
        let silent = async {
            tokio::time::sleep(header_timeout).await;
            if heard.load(Ordering::Acquire) {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = connection.as_mut() => {}
            () = silent => {}
            () = self.stop.cancelled() => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
    }
}

/// A connection that says whether any byte has arrived on it.
struct Heard<IO> {
    io: IO,
    heard: Arc<AtomicBool>,
}

impl<IO> Heard<IO> {
    fn new(io: IO) -> (Self, Arc<AtomicBool>) {
        let heard = Arc::new(AtomicBool::new(false));
        let watched = Self {
            io,
            heard: Arc::clone(&heard),
        };
        (watched, heard)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Heard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.heard.store(true, Ordering::Release);
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Heard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
