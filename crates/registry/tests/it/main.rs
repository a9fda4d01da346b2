//! The registry over real HTTP on loopback, with fake service instances.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod api;
mod cluster;
mod security;
mod support;
