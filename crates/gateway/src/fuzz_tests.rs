//! Bounded fuzzing of the gateway's parsers (`keel_serve::fuzz`): request heads,
//! response heads and the chunked decoder take any bytes without panicking, and what
//! they accept stays within what they were given. `KEEL_FUZZ_INPUTS=10000000` runs
//! each target long by hand.

use http::Method;
use keel_serve::fuzz::{Budget, run};

use crate::chunked::{Chunked, Piece};
use crate::http1::{HeadLimits, Relay, parse_request, parse_response};

const REQUESTS: &[&[u8]] = &[
    b"GET /svc/x?y=1 HTTP/1.1\r\nhost: t\r\nx-forwarded-for: 1.2.3.4\r\n\r\n",
    b"POST /svc/ HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\nhello",
    b"PUT /svc/u HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\nconnection: keep-alive, x-hop\r\nx-hop: 1\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET http://h/svc/abs HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
];

const RESPONSES: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x\r\n\r\n2\r\nok\r\n0\r\nx: y\r\n\r\n",
    b"HTTP/1.0 204 No Content\r\nconnection: close\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 304 Not Modified\r\netag: \"a\"\r\n\r\n",
];

const CHUNKED: &[&[u8]] = &[
    b"5\r\nhello\r\n0\r\n\r\n",
    b"a;ext=1;name=\"v\"\r\n0123456789\r\n0\r\ntrailer-field: value\r\n\r\n",
    b"0\r\n\r\n",
];

#[test]
fn request_heads_should_never_panic_and_stay_within_their_input() {
    let limits = HeadLimits { header_bytes: 1024 };
    run(REQUESTS, Budget::default(), |input| {
        let mut host = Vec::new();
        let mut forwarded = 0usize;
        if let Ok(Some(head)) = parse_request(
            input,
            limits,
            |name, value| forwarded += name.len() + value.len(),
            &mut host,
        ) {
            assert!(head.len <= input.len() && head.len <= limits.buffered());
            assert!(forwarded + host.len() <= input.len());
            assert!(head.target.starts_with('/'));
        }
    });
}

#[test]
fn response_heads_should_never_panic_and_stay_within_their_input() {
    run(RESPONSES, Budget::default(), |input| {
        for method in [Method::GET, Method::HEAD] {
            for http10 in [false, true] {
                let mut relay = Relay {
                    http10,
                    keep_alive: true,
                };
                let mut out = Vec::new();
                if let Ok(Some(head)) = parse_response(input, &method, &mut relay, &mut out) {
                    assert!(head.len <= input.len());
                    // The client's head is written for final responses (1xx are skipped).
                    assert!(
                        head.status < 200 || out.ends_with(b"\r\n\r\n"),
                        "{:?}",
                        String::from_utf8_lossy(&out)
                    );
                }
            }
        }
    });
}

#[test]
fn the_chunked_decoder_should_never_panic_and_account_for_every_byte() {
    run(CHUNKED, Budget::default(), |input| {
        // Cut the input at one place: the decoder must give the same answer either way.
        let cut = input.len() / 2;
        let mut whole = Chunked::default();
        let mut parts = Chunked::default();
        let a = consume(&mut whole, input);
        let b = consume(&mut parts, &input[..cut]).and_then(|first| {
            if parts.is_done() {
                Ok(first)
            } else {
                consume(&mut parts, &input[cut..]).map(|second| first + second)
            }
        });
        match (a, b) {
            (Ok(x), Ok(y)) => assert_eq!(x, y),
            (Err(_), Err(_)) => {}
            (a, b) => panic!("split input changed the result: {a:?} vs {b:?}"),
        }
    });
}

/// Bytes of `input` the decoder takes (data and framing) before it ends or runs out.
fn consume(state: &mut Chunked, input: &[u8]) -> Result<usize, String> {
    let mut at = 0;
    while let Some(piece) = state.next(&input[at..])? {
        let n = match piece {
            Piece::Data(n) | Piece::Framing(n) | Piece::End(n) => n,
        };
        assert!(n > 0 && at + n <= input.len(), "a piece past the input");
        at += n;
        if state.is_done() {
            break;
        }
    }
    Ok(at)
}
