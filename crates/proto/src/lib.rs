//! keel's wire types: the protobuf messages and gRPC services of `proto/`, generated
//! at build time without a system `protoc`.
//!
//! This crate owns the generated code and nothing else; conversions to and from the
//! domain types live in the crates that own those types.

/// The log service, package `log.v1`.
pub mod log {
    /// Version 1, compatible with the original log service.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
        tonic::include_proto!("log.v1");
    }
}

/// Raft between keel nodes, package `keel.raft.v1`.
pub mod raft {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
        tonic::include_proto!("keel.raft.v1");
    }
}

/// The encoded `FileDescriptorSet` of every keel proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
