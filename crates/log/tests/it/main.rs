//! Integration tests: a real log service on loopback, driven over gRPC and HTTP.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod cluster;
mod compat;
mod grpc;
mod http;
mod security;
mod support;
mod tls;
