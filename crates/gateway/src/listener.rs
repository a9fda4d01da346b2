//! The client's address, as handlers see it, for connections handed over by
//! `keel-serve` (which also holds the connection limit).

use std::net::SocketAddr;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;

/// The client's address, as handlers see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) SocketAddr);

impl Connected<IncomingStream<'_, keel_serve::Handed>> for Peer {
    fn connect_info(stream: IncomingStream<'_, keel_serve::Handed>) -> Self {
        Self(*stream.remote_addr())
    }
}
