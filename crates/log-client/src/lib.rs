//! The client side of keel's log service: what a program needs to talk to it, and
//! nothing of the server.
//!
//! ```text
//!  Client ── gRPC log.v1.Log over Channel (one HTTP/2 connection, h2) ──> log service
//!  Shipper ── bounded buffer ── batches over HTTP POST /v1/topics/{t}/records ──┘
//! ```
//!
//! - [`Client`]: produce, consume, tail and list topics over gRPC; connects again
//!   after the connection breaks.
//! - [`Channel`]: the client's HTTP/2 transport, also usable under the generated
//!   `log.v1` client ([`Client::grpc`]).
//! - [`Shipper`]: sends lines to a topic in the background and never makes its caller
//!   wait (the SDK's log shipping, the gateway's access log).
//!
//! This crate knows nothing of the storage engine or the server: the gateway, the SDK
//! and the demos depend on it alone. The server (`keel-log`) uses its [`TopicInfo`] for
//! its listings, so both sides share one shape.

mod channel;
mod client;
mod shipper;

pub use channel::{Channel, Credentials, ResponseBody};
pub use client::{Client, ClientError, DEFAULT_RETRY_FOR, new_producer_id};
pub use shipper::{Shipper, ShipperStats};

/// A record's place in a topic: dense, from 0.
pub type Offset = u64;

/// One record read from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's place in the topic.
    pub offset: Offset,
    /// When the record was appended, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The bytes that were appended.
    pub value: bytes::Bytes,
}

/// Offsets and sizes of a topic, for listings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TopicInfo {
    /// The topic's name.
    pub name: String,
    /// Its lowest retained offset.
    pub lowest_offset: Offset,
    /// The offset its next record will get.
    pub next_offset: Offset,
    /// Bytes of its store files.
    pub size_bytes: u64,
    /// Number of segments.
    pub segments: usize,
}
