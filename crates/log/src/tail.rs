//! Streaming reads: replay from an offset, then follow new appends.
//!
//! A tail waits on the topic's next-offset signal, so an idle tail costs no CPU and
//! sees a new record as soon as its group commit is done. It ends when the client
//! goes away, when the server shuts down, or (without `follow`) when it has caught
//! up. Each tail reads on its own and feeds a bounded channel: a slow consumer only
//! slows itself, never a producer.

use std::sync::Arc;

use keel_commitlog::{Offset, Record};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::LogServiceError;
use crate::topic::Topic;

/// Where a tail starts and how it reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TailSpec {
    pub(crate) from: Offset,
    pub(crate) max_bytes: usize,
    pub(crate) follow: bool,
}

/// Spawns a tail that sends `to_message(chunk)` for every chunk read, and returns
/// the receiving end. Errors are sent once, and end the tail.
pub(crate) fn spawn_tail<M, E>(
    topic: Arc<Topic>,
    spec: TailSpec,
    shutdown: CancellationToken,
    buffer: usize,
    to_messages: impl Fn(Vec<Record>) -> Vec<M> + Send + 'static,
) -> mpsc::Receiver<Result<M, E>>
where
    M: Send + 'static,
    E: From<LogServiceError> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(buffer.max(1));
    tokio::spawn(async move {
        let result = run(&topic, spec, &shutdown, &tx, to_messages).await;
        if let Err(err) = result {
            let _ = tx.send(Err(E::from(err))).await;
        }
    });
    rx
}

async fn run<M, E>(
    topic: &Topic,
    spec: TailSpec,
    shutdown: &CancellationToken,
    tx: &mpsc::Sender<Result<M, E>>,
    to_messages: impl Fn(Vec<Record>) -> Vec<M>,
) -> Result<(), LogServiceError> {
    let _consumer = crate::metrics::ConsumerGuard::new(topic.metrics());
    let mut next = topic.watch_next();
    let mut from = spec.from;
    loop {
        if spec.follow && *next.borrow_and_update() <= from {
            // Caught up (or asked for an offset not written yet): wait for an append.
            tokio::select! {
                changed = next.wait_for(|&next| next > from) => {
                    if changed.is_err() {
                        return Ok(()); // the topic closed
                    }
                }
                () = shutdown.cancelled() => return Ok(()),
                () = tx.closed() => return Ok(()),
            }
        }
        let chunk = tokio::select! {
            chunk = topic.read_chunk(from, spec.max_bytes) => chunk?,
            () = shutdown.cancelled() => return Ok(()),
        };
        if chunk.is_empty() {
            if spec.follow {
                continue;
            }
            return Ok(());
        }
        from += chunk.len() as u64;
        for message in to_messages(chunk) {
            tokio::select! {
                sent = tx.send(Ok(message)) => {
                    if sent.is_err() {
                        return Ok(()); // the client went away
                    }
                }
                // A client that stops reading must not hold up shutdown.
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}
