//! A replica's write path: writes wait in one queue; a task takes every write
//! waiting, makes one append command per topic of them, and hands each to Raft
//! (this node if it leads, else forwarded to the leader), in the order they came.
//! Replies come back as commands are applied, and are split among the writes.

use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use keel_commitlog::Offset;
use keel_raft::{Command, WriteError, Writer};
use tokio::sync::{mpsc, oneshot};

use super::command::{Append, Outcome, ProducerSeq, Request, decode_reply};
use crate::error::LogServiceError;
use crate::topics::Acked;

/// Commands proposed and not yet answered, at most. While that many are in flight,
/// writes gather in the queue and go out together in the next commands: the busier
/// the node, the bigger its commands, and the fewer Raft entries per record.
pub(crate) const COMMANDS_IN_FLIGHT: usize = 4;

/// One write waiting for its command.
struct Write {
    topic: String,
    request: Request,
    reply: oneshot::Sender<Result<Range<Offset>, LogServiceError>>,
}

/// Hands a replica's writes to Raft.
#[derive(Debug, Clone)]
pub(crate) struct Proposer {
    queue: mpsc::Sender<Write>,
    enqueue_timeout: Duration,
}

impl Proposer {
    /// Starts the task that proposes through `writer`: each command carries up to
    /// `max_batch_bytes` of values; at most [`COMMANDS_IN_FLIGHT`] commands await
    /// their commit, each for at most `commit_timeout`.
    pub(crate) fn start(
        writer: Writer,
        queue_depth: usize,
        enqueue_timeout: Duration,
        max_batch_bytes: usize,
        commit_timeout: Duration,
    ) -> Self {
        let (queue, writes) = mpsc::channel(queue_depth.max(1));
        let limits = Limits {
            max_batch_bytes,
            commit_timeout,
        };
        tokio::spawn(propose(writer, writes, limits));
        Self {
            queue,
            enqueue_timeout,
        }
    }

    /// Queues a write and returns the future of its offsets.
    pub(crate) async fn submit(
        &self,
        topic: String,
        values: Vec<Bytes>,
        tag: Option<ProducerSeq>,
    ) -> Result<Acked, LogServiceError> {
        let (reply, offsets) = oneshot::channel();
        let write = Write {
            topic: topic.clone(),
            request: Request { tag, values },
            reply,
        };
        match tokio::time::timeout(self.enqueue_timeout, self.queue.send(write)).await {
            Ok(Ok(())) => Ok(Box::pin(async move {
                offsets.await.unwrap_or(Err(LogServiceError::ShuttingDown))
            })),
            Ok(Err(_)) => Err(LogServiceError::ShuttingDown),
            Err(_) => Err(LogServiceError::Overloaded { topic }),
        }
    }
}

/// How the proposing task batches and waits.
struct Limits {
    max_batch_bytes: usize,
    commit_timeout: Duration,
}

/// The proposing task: runs until every sender is gone.
async fn propose(writer: Writer, mut writes: mpsc::Receiver<Write>, limits: Limits) {
    let Limits {
        max_batch_bytes,
        commit_timeout,
    } = limits;
    // The commands awaiting their commit, polled here: their answers are handed
    // out by this task, with no task of their own.
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            first = writes.recv(), if open && in_flight.len() < COMMANDS_IN_FLIGHT => {
                let Some(first) = first else {
                    open = false;
                    continue;
                };
                let mut bytes = size(&first);
                let mut groups: Vec<(String, Vec<Write>)> = Vec::new();
                add(&mut groups, first);
                while bytes < max_batch_bytes {
                    let Ok(more) = writes.try_recv() else { break };
                    bytes += size(&more);
                    add(&mut groups, more);
                }
                for (topic, group) in groups {
                    let (requests, replies): (Vec<Request>, Vec<_>) =
                        group.into_iter().map(|w| (w.request, w.reply)).unzip();
                    let command = Append {
                        timestamp_ms: now_ms(),
                        topic,
                        requests,
                    }
                    .encode();
                    match writer.submit(Command(command)).await {
                        Ok(pending) => in_flight.push(async move {
                            let result = tokio::time::timeout(commit_timeout, pending)
                                .await
                                .unwrap_or_else(|_| {
                                    Err(WriteError::Unavailable(format!(
                                        "the write was not committed within {commit_timeout:?}: no majority answers the leader"
                                    )))
                                });
                            answer(result, replies);
                        }),
                        Err(err) => answer(Err(err), replies),
                    }
                }
            }
            else => return,
        }
    }
}

fn size(write: &Write) -> usize {
    write.request.values.iter().map(Bytes::len).sum::<usize>() + 16
}

/// Puts a write with the others of its topic, keeping their order.
fn add(groups: &mut Vec<(String, Vec<Write>)>, write: Write) {
    match groups.iter_mut().find(|(topic, _)| *topic == write.topic) {
        Some((_, group)) => group.push(write),
        None => groups.push((write.topic.clone(), vec![write])),
    }
}

/// Answers each write of a command with its part of the command's reply.
fn answer(
    result: Result<keel_raft::Reply, WriteError>,
    replies: Vec<oneshot::Sender<Result<Range<Offset>, LogServiceError>>>,
) {
    let outcomes = result
        .map_err(|err| match err {
            WriteError::Stopped(_) => LogServiceError::ShuttingDown,
            other => LogServiceError::Unavailable(other.to_string()),
        })
        .and_then(|reply| {
            decode_reply(reply.0).map_err(|err| LogServiceError::Unavailable(err.to_string()))
        })
        .and_then(|outcomes| {
            if outcomes.len() == replies.len() {
                Ok(outcomes)
            } else {
                Err(LogServiceError::Unavailable(format!(
                    "the command was answered with {} outcomes for {} writes",
                    outcomes.len(),
                    replies.len()
                )))
            }
        });
    match outcomes {
        Ok(outcomes) => {
            for (outcome, reply) in outcomes.into_iter().zip(replies) {
                let _ = reply.send(match outcome {
                    Outcome::Appended(range) | Outcome::Duplicate(range) => Ok(range),
                    Outcome::TooOld { latest } => Err(LogServiceError::SequenceTooOld { latest }),
                });
            }
        }
        Err(err) => {
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

/// Milliseconds since the Unix epoch, for the records' timestamps (a replica never
/// stamps a record earlier than the one before it).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}
