//! Connections to upstreams: each serving thread keeps a pool of open HTTP/1.1
//! connections per upstream address. A connection serves one exchange at a time, on
//! the task of the client request it carries, and goes back to the pool when the
//! response has been read whole.

use std::collections::HashMap;
use std::io;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;

/// Idle connections kept per upstream at most.
const IDLE_PER_UPSTREAM: usize = 256;

/// Buffer space an upstream connection starts with (response heads fit in it).
pub(crate) const READ_BUFFER: usize = 8 * 1024;

/// An open connection to an upstream, with the bytes read from it and not used yet.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) stream: TcpStream,
    pub(crate) buf: BytesMut,
    /// Taken from the pool (it served an exchange before).
    pub(crate) reused: bool,
}

/// The pool of one serving thread.
#[derive(Debug)]
pub(crate) struct Upstreams {
    idle: Mutex<HashMap<String, Vec<Upstream>>>,
    connect_timeout: Duration,
}

impl Upstreams {
    pub(crate) fn new(connect_timeout: Duration) -> Self {
        Self {
            idle: Mutex::default(),
            connect_timeout,
        }
    }

    /// An open connection to `authority` (`host:port`): an idle one from the pool if
    /// there is one still open, else a new one.
    ///
    /// # Errors
    ///
    /// Connecting failed or took longer than the connect timeout: nothing was sent.
    pub(crate) async fn get(&self, authority: &str) -> io::Result<Upstream> {
        if let Some(pooled) = self.pooled(authority) {
            return Ok(pooled);
        }
        self.connect(authority).await
    }

    /// A new connection to `authority`.
    ///
    /// # Errors
    ///
    /// As [`Upstreams::get`].
    pub(crate) async fn connect(&self, authority: &str) -> io::Result<Upstream> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(authority))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect timed out after {:?}", self.connect_timeout),
                )
            })??;
        let _ = stream.set_nodelay(true);
        Ok(Upstream {
            stream,
            buf: BytesMut::with_capacity(READ_BUFFER),
            reused: false,
        })
    }

    fn pooled(&self, authority: &str) -> Option<Upstream> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let connections = idle.get_mut(authority)?;
        while let Some(mut upstream) = connections.pop() {
            if still_open(&upstream.stream) {
                upstream.reused = true;
                return Some(upstream);
            }
        }
        None
    }

    /// Returns a connection whose last response was read whole and that the upstream
    /// keeps open.
    pub(crate) fn put(&self, authority: &str, upstream: Upstream) {
        if !upstream.buf.is_empty() {
            // Bytes after the response: the upstream does not speak HTTP/1.1 properly.
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        match idle.get_mut(authority) {
            Some(connections) if connections.len() < IDLE_PER_UPSTREAM => {
                connections.push(upstream);
            }
            Some(_) => {}
            None => {
                idle.insert(authority.to_owned(), vec![upstream]);
            }
        }
    }
}

/// Whether an idle connection is still open: nothing to read on it (an upstream that
/// closed it left an end of stream there). Costs no system call unless the connection
/// became readable while idle.
fn still_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        // Readable: closed, or readiness left from the last read. Look.
        Poll::Ready(Ok(())) => matches!(
            stream.try_read(&mut [0u8; 1]),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn a_pooled_connection_closed_by_its_upstream_should_not_be_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let pool = Upstreams::new(Duration::from_secs(1));

        let open = pool.get(&authority).await.unwrap();
        let (mut kept, _) = listener.accept().await.unwrap();
        let closing = pool.connect(&authority).await.unwrap();
        let (closed, _) = listener.accept().await.unwrap();
        pool.put(&authority, open);
        pool.put(&authority, closing);
        drop(closed);
        // The close reaches the pooled connection; wait for it with a deadline.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let readable = pool.idle.lock().unwrap()[&authority].iter().any(|u| {
                let mut cx = Context::from_waker(Waker::noop());
                u.stream.poll_read_ready(&mut cx).is_ready()
            });
            if readable || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // The closed one is skipped; the open one is found and marked reused.
        let mut reused = pool.get(&authority).await.unwrap();
        assert!(reused.reused);
        reused.stream.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        kept.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        assert!(pool.idle.lock().unwrap()[&authority].is_empty());
    }

    #[tokio::test]
    async fn a_connection_with_unread_bytes_should_not_go_back_to_the_pool() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let pool = Upstreams::new(Duration::from_secs(1));
        let mut upstream = pool.get(&authority).await.unwrap();
        upstream.buf.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        pool.put(&authority, upstream);
        assert!(pool.idle.lock().unwrap().get(&authority).is_none());
    }
}
