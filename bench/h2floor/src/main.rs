//! The floor of a unary `log.v1.Log/Produce` over HTTP/2: the `h2` crate alone (no
//! hyper, axum or tonic, no writer thread), one thread, each record written and
//! `fdatasync`ed before its answer. Not a server: a measuring stick for
//! docs/benchmarks.md, driven by `keel-bench compare --system keel`.
//!
//! ```sh
//! cargo build --release --manifest-path bench/h2floor/Cargo.toml
//! bench/h2floor/target/release/h2floor 127.0.0.1:39200 /tmp/h2floor.data &
//! target/release/keel-bench compare --system keel --url 127.0.0.1:39200 \
//!     --workload produce:1 --run a --server-pid $!
//! ```

use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};

/// The file the records go to, and where the next one goes.
struct Store {
    file: std::fs::File,
    next: u64,
    at: u64,
}

impl Store {
    /// Writes and syncs `value`; returns its offset.
    fn append(&mut self, value: &[u8]) -> std::io::Result<u64> {
        self.file.write_all_at(value, self.at)?;
        self.file.sync_data()?;
        self.at += value.len() as u64;
        self.next += 1;
        Ok(self.next - 1)
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(path)) = (args.next(), args.next()) else {
        eprintln!("usage: h2floor ADDR DATA_FILE");
        std::process::exit(2);
    };
    let file = std::fs::File::create(path)?;
    // Preallocated, as keel's store is: a sync that does not grow the file.
    file.set_len(256 << 20)?;
    let store = Arc::new(Mutex::new(Store {
        file,
        next: 0,
        at: 0,
    }));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        loop {
            let (tcp, _) = listener.accept().await?;
            tcp.set_nodelay(true)?;
            tokio::spawn(connection(tcp, Arc::clone(&store)));
        }
    })
}

async fn connection(tcp: tokio::net::TcpStream, store: Arc<Mutex<Store>>) {
    let Ok(mut connection) = h2::server::handshake(tcp).await else {
        return;
    };
    while let Some(Ok((request, respond))) = connection.accept().await {
        tokio::spawn(produce(request, respond, Arc::clone(&store)));
    }
}

/// Appends the request's `ProduceRequest` message whole (the floor needs no decoding
/// beyond the gRPC frame) and answers a `ProduceResponse{offset}`.
async fn produce(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    store: Arc<Mutex<Store>>,
) {
    let mut body = request.into_body();
    let mut message = BytesMut::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        message.extend_from_slice(&chunk);
    }
    let value = if message.len() > 5 {
        message.split_off(5)
    } else {
        BytesMut::new()
    };
    let appended = store
        .lock()
        .map_err(|_| std::io::Error::other("poisoned"))
        .and_then(|mut store| store.append(&value));
    let Ok(offset) = appended else {
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    };
    // ProduceResponse: field 1, a varint (absent when 0).
    let mut answer = BytesMut::new();
    if offset > 0 {
        answer.put_u8(0x08);
        let mut rest = offset;
        while rest >= 0x80 {
            answer.put_u8((rest as u8) | 0x80);
            rest >>= 7;
        }
        answer.put_u8(rest as u8);
    }
    let mut framed = BytesMut::with_capacity(5 + answer.len());
    framed.put_u8(0);
    framed.put_u32(answer.len() as u32);
    framed.extend_from_slice(&answer);
    let head = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(());
    let Ok(head) = head else { return };
    let Ok(mut send) = respond.send_response(head, false) else {
        return;
    };
    let _ = send.send_data(framed.freeze(), false);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let _ = send.send_trailers(trailers);
}
