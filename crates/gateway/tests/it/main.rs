//! The gateway between real clients and real backends on loopback.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod proxy;
mod security;
mod support;
mod wire;
