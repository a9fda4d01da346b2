//! keel-raft's integration tests: openraft's conformance suite against keel's
//! storage, and the storage's own promises across restarts.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

mod cluster;
mod storage;
mod suite;
mod support;
