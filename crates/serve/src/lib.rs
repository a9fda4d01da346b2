//! Thread-per-core serving for keel's servers (the log service and the gateway).
//!
//! ```text
//!                      ┌─> serving thread 0: single-threaded runtime, its connections
//!  listener ─> acceptor ┼─> serving thread 1: ...
//!   (one)   round-robin └─> serving thread N-1
//! ```
//!
//! One acceptor task takes every connection (after taking one of the connection
//! slots, when there is a limit; past it, clients wait in the kernel's backlog), sets
//! `TCP_NODELAY`, and hands it to the serving threads in turn. Each serving thread
//! drives its connections on its own single-threaded runtime, so a request is read,
//! handled and answered without waking another thread, and the connections are spread
//! evenly whatever the timing of their arrival (threads that each accepted from a
//! shared socket would race for them, and one thread could end up with most).
//!
//! This crate owns the threads, the acceptor and the handing over; what a thread
//! serves is the caller's: [`serve`] calls it with a [`Handed`] listener, which
//! `axum::serve` takes like a `TcpListener`.
//!
//! It is also the one home of what every keel server does the same way over HTTP
//! ([`http`]: the JSON error envelope, bounded bodies, Prometheus text, serving until
//! shutdown; [`openapi`]: each API's OpenAPI document, served and held to its routes)
//! and of the error a component's config validation returns
//! ([`InvalidConfig`]), and of keel's TLS ([`tls`]) and outbound HTTP clients
//! ([`client`]). It depends on no other keel crate.

mod app;
pub mod client;
mod fd_limit;
pub mod fuzz;
pub mod http;
mod invalid_config;
pub mod openapi;
mod roster;
pub mod tls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use app::{AppLimits, serve_app};
pub use fd_limit::connections_within_fd_limit;
pub use invalid_config::InvalidConfig;
pub use roster::Idle;
use roster::Roster;

/// How many threads serve, and how many connections may be open at once.
#[derive(Debug, Clone)]
pub struct Options {
    /// Serving threads; 0 means one per core.
    pub threads: usize,
    /// Connections open at once across all threads; `None` for no limit. At the
    /// limit, a new client takes the slot of the connection that has waited longest
    /// for a request (see [`Idle`]), or waits for one.
    pub max_connections: Option<usize>,
    /// Counts the connections closed to make room for new ones.
    pub shed: Arc<std::sync::atomic::AtomicU64>,
    /// Prefix of the threads' names (`<name>-0`, `<name>-1`, ...).
    pub name: String,
}

impl Options {
    /// The number of serving threads these options start.
    pub fn thread_count(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }
}

/// A connection accepted for a serving thread: not yet registered with any runtime.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: Option<OwnedSemaphorePermit>,
    idle: Idle,
}

/// Connections handed to a serving thread that it has not taken yet. When a thread
/// falls this far behind, the acceptor waits, and new clients wait in the kernel's
/// backlog.
const HANDOFF_QUEUE: usize = 128;

/// The listener of one serving thread: it yields the connections the acceptor hands
/// this thread, registered with the thread's runtime.
pub struct Handed {
    incoming: mpsc::Receiver<Accepted>,
    local: SocketAddr,
}

/// A connection, holding its slot (if there is a connection limit) until dropped.
pub struct Connection {
    stream: TcpStream,
    _slot: Option<OwnedSemaphorePermit>,
    idle: Option<Idle>,
}

impl Connection {
    /// The connection's say in shedding (see [`Idle`]), for a server that can tell
    /// when it waits for a request; keep it as long as the connection.
    pub fn take_idle(&mut self) -> Idle {
        self.idle.take().unwrap_or_else(Idle::unlimited)
    }
}

impl axum::serve::Listener for Handed {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some(accepted) = self.incoming.recv().await else {
                // The acceptor stopped: shutdown is under way, and the caller's
                // graceful shutdown ends the serving loop. Wait rather than spin.
                std::future::pending::<()>().await;
                continue;
            };
            match TcpStream::from_std(accepted.stream) {
                Ok(stream) => {
                    let connection = Connection {
                        stream,
                        _slot: accepted.slot,
                        idle: Some(accepted.idle),
                    };
                    return (connection, accepted.peer);
                }
                Err(err) => tracing::warn!(error = %err, "adopting a connection failed"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serves on `listener` with [`Options::thread_count`] threads until `stop` is
/// cancelled and every thread's serving future has ended. On each thread,
/// `serve_thread(index, handed)` makes the future that serves it (typically
/// `axum::serve(handed, app).with_graceful_shutdown(stop)`); the future runs on the
/// thread's own single-threaded runtime, so it need not be `Send`.
///
/// A thread whose future ends before `stop` is cancelled, or that panics, cancels
/// `stop` and fails the whole: the first error is returned once all threads ended.
///
/// # Errors
///
/// Starting a thread or its runtime failed, or a serving future failed.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    options: Options,
    stop: CancellationToken,
    serve_thread: F,
) -> io::Result<()>
where
    F: Fn(usize, Handed) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<()>>,
{
    let local = listener.local_addr()?;
    let serve_thread = Arc::new(serve_thread);
    let mut threads = FuturesUnordered::new();
    let mut outlets = Vec::new();
    for index in 0..options.thread_count() {
        let (outlet, incoming) = mpsc::channel(HANDOFF_QUEUE);
        let handed = Handed { incoming, local };
        let (finished, finished_rx) = oneshot::channel();
        let serve_thread = Arc::clone(&serve_thread);
        let spawned = std::thread::Builder::new()
            .name(format!("{}-{index}", options.name))
            .spawn(move || {
                let served = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .and_then(|runtime| runtime.block_on(serve_thread(index, handed)));
                let _ = finished.send(served);
            });
        if let Err(err) = spawned {
            stop.cancel();
            return Err(err);
        }
        threads.push(finished_rx);
        outlets.push(outlet);
    }

    let slots = options
        .max_connections
        .map(|n| Arc::new(Semaphore::new(n.max(1))));
    let roster = Arc::new(Roster::new(Arc::clone(&options.shed)));
    let mut failure = None;
    let mut next = 0usize;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            ended = threads.next() => {
                let ended = ended.map_or(Ok(()), thread_result);
                if stop.is_cancelled() {
                    // Shutdown began while this thread finished: a normal end.
                    failure = ended.err().map(Err);
                } else {
                    // A thread that ends before shutdown has failed.
                    failure = Some(ended.and(Err(io::Error::other("a serving thread stopped early"))));
                    stop.cancel();
                }
                break;
            }
            accepted = accept(&listener, slots.as_ref(), &roster) => {
                let Some(accepted) = accepted else { continue };
                let thread = next % outlets.len();
                next = next.wrapping_add(1);
                tokio::select! {
                    biased;
                    // A thread that no longer takes connections must not hold up the stop.
                    () = stop.cancelled() => break,
                    handed = outlets[thread].send(accepted) => if handed.is_err() {
                        tracing::warn!(thread, "a serving thread is gone; dropped its connection");
                    },
                }
            }
        }
    }
    drop(outlets);
    while let Some(ended) = threads.next().await {
        if let Err(err) = thread_result(ended) {
            failure.get_or_insert(Err(err));
        }
    }
    failure.unwrap_or(Ok(()))
}

fn thread_result(ended: Result<io::Result<()>, oneshot::error::RecvError>) -> io::Result<()> {
    ended.unwrap_or_else(|_| Err(io::Error::other("a serving thread panicked")))
}

/// Takes a connection and a slot for it (when there is a limit). When every slot is
/// taken, a client that arrives has the connection waiting longest for a request
/// closed, and takes its slot (see [`take_a_slot`]); meanwhile the others wait in the
/// kernel's backlog. `None` after a failed
/// accept (out of file descriptors and the like), after a pause, as axum does.
async fn accept(
    listener: &TcpListener,
    slots: Option<&Arc<Semaphore>>,
    roster: &Arc<Roster>,
) -> Option<Accepted> {
    let (slot, accepted) = match slots {
        None => (None, listener.accept().await),
        Some(slots) => match Arc::clone(slots).try_acquire_owned() {
            Ok(slot) => (Some(slot), listener.accept().await),
            Err(_) => {
                let accepted = tokio::select! {
                    slot = Arc::clone(slots).acquire_owned() => {
                        (Some(slot.ok()?), listener.accept().await)
                    }
                    accepted = listener.accept() => {
                        if accepted.is_err() {
                            (None, accepted)
                        } else {
                            (Some(take_a_slot(slots, roster).await?), accepted)
                        }
                    }
                };
                accepted
            }
        },
    };
    match accepted {
        Ok((stream, peer)) => {
            if let Err(err) = stream.set_nodelay(true) {
                tracing::warn!(error = %err, "cannot set TCP_NODELAY on a connection");
            }
            match stream.into_std() {
                Ok(stream) => Some(Accepted {
                    stream,
                    peer,
                    slot,
                    idle: roster.enroll(),
                }),
                Err(err) => {
                    tracing::warn!(error = %err, "handing a connection over failed");
                    None
                }
            }
        }
        Err(err) => {
            // Out of descriptors (EMFILE, ENFILE) lasts until connections close: pause
            // long enough not to spin, nor to fill the log with this line.
            let out_of_files = matches!(err.raw_os_error(), Some(23 | 24));
            tracing::warn!(error = %err, "accepting a connection failed");
            let pause = if out_of_files { 1000 } else { 50 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
            None
        }
    }
}

/// A slot for a client that found every slot taken: the slot of the connection
/// waiting longest for a request, as soon as one has waited long enough to be shed,
/// or the first slot another connection gives back.
async fn take_a_slot(slots: &Arc<Semaphore>, roster: &Roster) -> Option<OwnedSemaphorePermit> {
    loop {
        if roster.shed_oldest() {
            tracing::debug!("every connection slot was taken: closed the connection idle longest");
        }
        tokio::select! {
            slot = Arc::clone(slots).acquire_owned() => return slot.ok(),
            () = tokio::time::sleep(SHED_RETRY) => {}
        }
    }
}

/// How often a client waiting for a slot looks again for a connection to shed.
const SHED_RETRY: Duration = Duration::from_millis(20);

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn options(threads: usize, max_connections: Option<usize>) -> Options {
        Options {
            threads,
            max_connections,
            shed: Arc::default(),
            name: "test-serve".into(),
        }
    }

    /// Serves, on each thread, a one-route app that answers with the thread's index.
    async fn start(
        threads: usize,
        max_connections: Option<usize>,
    ) -> (
        SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(serve(
            listener,
            options(threads, max_connections),
            stop.clone(),
            move |index, handed| {
                let app = axum::Router::new().route(
                    "/",
                    axum::routing::get(move || async move { index.to_string() }),
                );
                let token = token.clone();
                async move {
                    axum::serve(handed, app)
                        .with_graceful_shutdown(async move { token.cancelled().await })
                        .await
                }
            },
        ));
        (addr, stop, task)
    }

    /// Sends one keep-alive GET on `stream` and returns the body.
    async fn get(stream: &mut TcpStream) -> String {
        send(stream).await;
        body(stream).await
    }

    async fn send(stream: &mut TcpStream) {
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
    }

    /// Reads one response from `stream` and returns its body.
    async fn body(stream: &mut TcpStream) -> String {
        let mut response = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed before the response ended");
            response.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&response);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length: "))
                    .map(|len| len.trim().parse().unwrap())
                    .unwrap();
                if body.len() >= len {
                    return body[..len].to_owned();
                }
            }
        }
    }

    #[test]
    fn thread_count_should_be_one_per_core_unless_set() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(options(0, None).thread_count(), cores);
        assert_eq!(options(3, None).thread_count(), 3);
    }

    #[tokio::test]
    async fn connections_should_be_spread_evenly_over_the_threads() {
        let (addr, stop, task) = start(3, None).await;
        let mut streams = Vec::new();
        let mut served_by = [0usize; 3];
        for _ in 0..9 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let index: usize = get(&mut stream).await.parse().unwrap();
            served_by[index] += 1;
            // A second request on the same connection stays on the same thread.
            assert_eq!(get(&mut stream).await, index.to_string());
            streams.push(stream);
        }
        assert_eq!(served_by, [3, 3, 3]);
        stop.cancel();
        drop(streams);
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn past_the_connection_limit_a_client_should_wait_until_a_connection_closes() {
        let (addr, stop, task) = start(2, Some(1)).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        get(&mut first).await;
        let mut second = TcpStream::connect(addr).await.unwrap();
        send(&mut second).await;
        let mut buf = [0u8; 1];
        let waiting = tokio::time::timeout(Duration::from_millis(300), second.peek(&mut buf)).await;
        assert!(
            waiting.is_err(),
            "the second connection is served only after the first closes"
        );
        drop(first);
        tokio::time::timeout(Duration::from_secs(10), body(&mut second))
            .await
            .expect("served once a slot is free");
        stop.cancel();
        drop(second);
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn threads_that_end_as_shutdown_begins_should_be_a_clean_stop() {
        // Both the stop and a thread's end are ready when serve looks: many rounds,
        // so that a choice between them by chance would show.
        for round in 0..50 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let stop = CancellationToken::new();
            let options = options(2, None);
            let token = stop.clone();
            let serving = tokio::spawn(serve(listener, options, stop.clone(), move |_, _| {
                let token = token.clone();
                async move {
                    token.cancelled().await;
                    Ok(())
                }
            }));
            // Let serve start its threads and wait, then stop them all.
            tokio::task::yield_now().await;
            stop.cancel();
            // Let the threads finish before serve looks again.
            std::thread::sleep(Duration::from_millis(5));
            let served = tokio::time::timeout(Duration::from_secs(10), serving)
                .await
                .expect("serve ends")
                .unwrap();
            assert!(served.is_ok(), "round {round}: {served:?}");
        }
    }

    #[tokio::test]
    async fn a_thread_that_stops_early_should_fail_the_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stop = CancellationToken::new();
        let options = options(2, None);
        let token = stop.clone();
        let served = serve(listener, options, stop.clone(), move |index, _handed| {
            let token = token.clone();
            async move {
                if index == 1 {
                    return Err(io::Error::other("thread 1 broke"));
                }
                token.cancelled().await;
                Ok(())
            }
        });
        let err = tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("serve ends")
            .expect_err("an early end is a failure");
        assert!(err.to_string().contains("thread 1 broke"), "{err}");
        assert!(stop.is_cancelled(), "the other threads were told to stop");
    }
}
