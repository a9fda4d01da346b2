//! Streaming reads: replay from an offset, then follow new appends.
//!
//! A tail waits on the topic's next-offset signal, so an idle tail costs no CPU and
//! sees a new record as soon as its group commit is done. It ends when the client
//! goes away, when the server shuts down, or (without `follow`) when it has caught
//! up. Each tail reads on its own, ahead of its connection: a slow consumer only
//! slows itself, never a producer.
//!
//! **Memory.** What a tail has read and its connection has not yet taken is bounded
//! in bytes, per reader and over all readers together ([`ReadAhead`]): before it
//! reads a chunk, a tail takes that many bytes from its own budget and from the
//! service's, and gives them back as the connection takes the chunk. A reader that
//! stops reading therefore holds at most its own budget here, plus the one message
//! its connection is writing (the socket's and HTTP/2's flow control stop the rest).
//! Chunks travel as records; the connection encodes each message only when it is
//! about to write it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use keel_commitlog::{Offset, Record};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::error::LogServiceError;
use crate::topic::Topic;

/// Bytes a record costs in a tail's budget beyond its value: its offset, timestamp
/// and framing, so that a stream of empty records is bounded too.
const RECORD_OVERHEAD: usize = 32;
/// Chunks a tail may have queued; the byte budget is what binds.
const QUEUED_CHUNKS: usize = 64;

/// Where a tail starts and how it reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TailSpec {
    pub(crate) from: Offset,
    pub(crate) max_bytes: usize,
    pub(crate) follow: bool,
}

/// The service's bound on the memory of streaming readers: read, not yet written.
#[derive(Debug, Clone)]
pub(crate) struct ReadAhead {
    total: Arc<Semaphore>,
    capacity: usize,
    per_reader: usize,
}

impl ReadAhead {
    /// At most `per_reader` bytes per tail and `total` over all of them.
    pub(crate) fn new(per_reader: usize, total: usize) -> Self {
        let capacity = total.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            total: Arc::new(Semaphore::new(capacity)),
            capacity,
            per_reader: per_reader.clamp(1, capacity),
        }
    }

    /// Bytes the tails hold now.
    pub(crate) fn held(&self) -> usize {
        self.capacity - self.total.available_permits()
    }
}

/// Bytes a tail holds for one chunk, from its own budget and the service's; given
/// back when dropped.
struct Held {
    reader: OwnedSemaphorePermit,
    total: OwnedSemaphorePermit,
}

impl Held {
    async fn take(reader: &Arc<Semaphore>, total: &Arc<Semaphore>, bytes: usize) -> Option<Self> {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        // The reader's own budget first: a tail never holds service bytes while it
        // waits for its consumer.
        let reader = Arc::clone(reader).acquire_many_owned(bytes).await.ok()?;
        let total = Arc::clone(total).acquire_many_owned(bytes).await.ok()?;
        Some(Self { reader, total })
    }

    fn merge(&mut self, other: Self) {
        self.reader.merge(other.reader);
        self.total.merge(other.total);
    }

    /// Gives back all but `keep` bytes.
    fn keep(&mut self, keep: usize) {
        let extra = self.reader.num_permits().saturating_sub(keep);
        drop(self.reader.split(extra));
        drop(self.total.split(extra));
    }
}

/// What a tail yields: chunks of consecutive records, each message of a response
/// made from one chunk; an error ends it.
pub(crate) struct Tail {
    rx: mpsc::Receiver<Queued>,
}

impl Stream for Tail {
    type Item = Result<Vec<Record>, LogServiceError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // The chunk's bytes go back to the budgets as the connection takes it.
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|(chunk, _held)| chunk))
    }
}

impl Tail {
    /// The same tail one record at a time. A chunk's bytes go back to the budgets
    /// once its last record was taken.
    pub(crate) fn records(self) -> Records {
        Records {
            tail: self,
            current: Vec::new().into_iter(),
            _held: None,
        }
    }
}

/// A tail one record at a time (see [`Tail::records`]).
pub(crate) struct Records {
    tail: Tail,
    current: std::vec::IntoIter<Record>,
    _held: Option<Held>,
}

impl Stream for Records {
    type Item = Result<Record, LogServiceError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(record) = self.current.next() {
                return Poll::Ready(Some(Ok(record)));
            }
            self._held = None;
            match std::task::ready!(self.tail.rx.poll_recv(cx)) {
                None => return Poll::Ready(None),
                Some((Err(err), _)) => return Poll::Ready(Some(Err(err))),
                Some((Ok(chunk), held)) => {
                    self.current = chunk.into_iter();
                    self._held = held;
                }
            }
        }
    }
}

/// Starts a tail of `topic` bounded by `read_ahead`, and returns its chunks.
pub(crate) fn spawn_tail(
    topic: Arc<Topic>,
    spec: TailSpec,
    shutdown: CancellationToken,
    read_ahead: &ReadAhead,
) -> Tail {
    let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
    let reader = Arc::new(Semaphore::new(read_ahead.per_reader));
    let budgets = (reader, Arc::clone(&read_ahead.total));
    // Half the budget per chunk, so that the tail reads one chunk while the
    // connection writes the one before.
    let chunk_bytes = spec.max_bytes.clamp(1, (read_ahead.per_reader / 2).max(1));
    let per_reader = read_ahead.per_reader;
    tokio::spawn(async move {
        let sizes = (chunk_bytes, per_reader);
        let result = run(&topic, spec, sizes, &shutdown, &tx, &budgets).await;
        if let Err(err) = result {
            let _ = tx.send((Err(err), None)).await;
        }
    });
    Tail { rx }
}

/// A chunk on its way to the connection, with the bytes it holds of the budgets.
type Queued = (Result<Vec<Record>, LogServiceError>, Option<Held>);
type Sender = mpsc::Sender<Queued>;

async fn run(
    topic: &Topic,
    spec: TailSpec,
    (chunk_bytes, per_reader): (usize, usize),
    shutdown: &CancellationToken,
    tx: &Sender,
    (reader, total): &(Arc<Semaphore>, Arc<Semaphore>),
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
                () = topic.retired() => return Err(LogServiceError::Unavailable(format!(
                    "topic {:?} was replaced by a snapshot from the leader; subscribe again from offset {from}",
                    topic.name()
                ))),
            }
        }
        // A client that stops reading waits here, holding no more than its budget.
        let mut held = tokio::select! {
            held = Held::take(reader, total, chunk_bytes) => match held {
                Some(held) => held,
                None => return Ok(()),
            },
            () = shutdown.cancelled() => return Ok(()),
            () = tx.closed() => return Ok(()),
        };
        let chunk = tokio::select! {
            chunk = topic.read_chunk(from, chunk_bytes) => chunk?,
            () = shutdown.cancelled() => return Ok(()),
        };
        if chunk.is_empty() {
            if spec.follow {
                continue;
            }
            return Ok(());
        }
        // A chunk holds at least one record, which may be larger than the chunk:
        // it then holds what it takes of the whole budget, and no other chunk is
        // read until the connection has taken it.
        let bytes = record_bytes(&chunk).min(per_reader);
        if bytes > chunk_bytes {
            let more = tokio::select! {
                more = Held::take(reader, total, bytes - chunk_bytes) => more,
                () = shutdown.cancelled() => return Ok(()),
                () = tx.closed() => return Ok(()),
            };
            if let Some(more) = more {
                held.merge(more);
            }
        }
        held.keep(bytes);
        from += chunk.len() as u64;
        if tx.send((Ok(chunk), Some(held))).await.is_err() {
            return Ok(()); // the client went away
        }
    }
}

/// What a chunk costs in a tail's budget.
fn record_bytes(records: &[Record]) -> usize {
    records
        .iter()
        .map(|record| record.value.len() + RECORD_OVERHEAD)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn held_bytes_should_go_back_to_both_budgets_when_dropped_or_trimmed() {
        let read_ahead = ReadAhead::new(100, 150);
        let reader = Arc::new(Semaphore::new(read_ahead.per_reader));
        let mut held = Held::take(&reader, &read_ahead.total, 100)
            .await
            .expect("open semaphores");
        assert_eq!((reader.available_permits(), read_ahead.held()), (0, 100));
        held.keep(30);
        assert_eq!((reader.available_permits(), read_ahead.held()), (70, 30));
        drop(held);
        assert_eq!((reader.available_permits(), read_ahead.held()), (100, 0));
    }

    #[test]
    fn a_reader_budget_should_never_exceed_the_total() {
        let read_ahead = ReadAhead::new(1 << 30, 1 << 20);
        assert_eq!(read_ahead.per_reader, 1 << 20);
    }
}
