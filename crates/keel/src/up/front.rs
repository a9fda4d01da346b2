//! The front door of `keel up --cluster`: one port (the gateway port, 20001) whose
//! TCP connections are spread over the gateways in turn. A gateway that refuses a
//! connection (it died and is being restarted) is skipped for the next, so new
//! connections only reach live gateways; a connection already open to a gateway that
//! dies ends, as it would behind any TCP load balancer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long connecting to one gateway may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Spreads the connections `listener` accepts over `backends` until `stop`; then
/// stops accepting and ends the connections it carries.
pub(super) async fn serve(
    listener: TcpListener,
    backends: Vec<SocketAddr>,
    stop: CancellationToken,
) {
    let next = Arc::new(AtomicUsize::new(0));
    let backends = Arc::new(backends);
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(err) => {
                // Out of descriptors, say: pause rather than spin.
                eprintln!("keel up: the front door cannot accept: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (backends, next, stop) = (Arc::clone(&backends), Arc::clone(&next), stop.clone());
        connections.spawn(async move {
            let Some(upstream) = connect(&backends, &next).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (mut client, mut upstream) = (client, upstream);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                () = stop.cancelled() => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// A connection to the next gateway that takes one, trying each at most once.
async fn connect(backends: &[SocketAddr], next: &AtomicUsize) -> Option<TcpStream> {
    for _ in 0..backends.len() {
        let at = next.fetch_add(1, Ordering::Relaxed) % backends.len();
        let backend = backends[at];
        if let Ok(Ok(stream)) =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await
        {
            return Some(stream);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An echo server that prefixes its answers with `tag`.
    async fn echo(tag: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    let _ = socket.write_all(tag.as_bytes()).await;
                    let _ = socket.write_all(&buf[..n]).await;
                });
            }
        });
        addr
    }

    async fn ask(front: SocketAddr) -> String {
        let mut socket = TcpStream::connect(front).await.unwrap();
        socket.write_all(b"hi").await.unwrap();
        let mut answer = String::new();
        socket.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn connections_should_take_turns_and_skip_a_dead_gateway() {
        let (a, b) = (echo("a:").await, echo("b:").await);
        let dead = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let served = tokio::spawn(serve(listener, vec![a, dead, b], stop.clone()));
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(ask(front).await);
        }
        assert_eq!(answers, ["a:hi", "b:hi", "a:hi", "b:hi"]);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .unwrap()
            .unwrap();
    }
}
