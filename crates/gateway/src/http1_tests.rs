//! Tests of `http1.rs`.

use super::*;
use proptest::prelude::*;

const LIMITS: HeadLimits = HeadLimits { header_bytes: 1024 };

fn request(raw: &str) -> (Result<Option<RequestHead>, HeadError>, Vec<String>, Vec<u8>) {
    let mut forwarded = Vec::new();
    let mut host = Vec::new();
    let parsed = parse_request(
        raw.as_bytes(),
        LIMITS,
        |name, value| {
            forwarded.push(format!("{name}: {}", String::from_utf8_lossy(value)));
        },
        &mut host,
    );
    (parsed, forwarded, host)
}

#[test]
fn a_request_head_should_keep_end_to_end_headers_and_drop_hop_by_hop_ones() {
    let (parsed, forwarded, host) = request(
        "POST /svc/a?b=1 HTTP/1.1\r\nHost: gw\r\nConnection: x-hop, keep-alive\r\nX-Hop: 1\r\n\
         Keep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\
         Content-Length: 4\r\nExpect: 100-continue\r\n\r\nbody",
    );
    let head = parsed.unwrap().unwrap();
    assert_eq!(head.method, Method::POST);
    assert_eq!(head.target, "/svc/a?b=1");
    assert_eq!(head.framing, Framing::Length(4));
    assert!(head.keep_alive && head.expect_continue && !head.http10);
    assert_eq!(head.len, raw_len_without_body());
    assert_eq!(forwarded, vec!["X-Kept: yes".to_owned()]);
    assert_eq!(host, b"gw");

    fn raw_len_without_body() -> usize {
        "POST /svc/a?b=1 HTTP/1.1\r\nHost: gw\r\nConnection: x-hop, keep-alive\r\nX-Hop: 1\r\n\
         Keep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\
         Content-Length: 4\r\nExpect: 100-continue\r\n\r\n"
            .len()
    }
}

#[test]
fn request_framing_should_follow_rfc_9112() {
    let framing = |raw: &str| request(raw).0.map(|h| h.map(|h| h.framing));
    assert_eq!(framing("GET / HTTP/1.1\r\n\r\n"), Ok(Some(Framing::Empty)));
    assert_eq!(
        framing("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
        Ok(Some(Framing::Length(0)))
    );
    assert_eq!(
        framing("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"),
        Ok(Some(Framing::Chunked))
    );
    assert_eq!(
        framing("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"),
        Ok(Some(Framing::Length(3)))
    );
    for smuggled in [
        "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        assert!(
            matches!(framing(smuggled), Err(HeadError::Invalid(_))),
            "{smuggled:?}"
        );
    }
    assert!(matches!(
        framing("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
        Err(HeadError::Unsupported(_))
    ));
}

#[test]
fn keep_alive_should_default_by_version() {
    let keep = |raw: &str| request(raw).0.unwrap().unwrap().keep_alive;
    assert!(keep("GET / HTTP/1.1\r\n\r\n"));
    assert!(!keep("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
    assert!(!keep("GET / HTTP/1.0\r\n\r\n"));
    assert!(keep("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
}

#[test]
fn heads_should_be_incomplete_until_the_blank_line_and_refused_past_the_limits() {
    assert!(matches!(request("GET / HTTP/1.1\r\nA: b\r\n").0, Ok(None)));
    let big = format!("GET / HTTP/1.1\r\nA: {}\r\n\r\n", "x".repeat(2000));
    assert!(matches!(request(&big).0, Err(HeadError::TooLarge(_))));
    let endless = format!("GET / HTTP/1.1\r\nA: {}", "x".repeat(LIMITS.buffered()));
    assert!(matches!(request(&endless).0, Err(HeadError::TooLarge(_))));
    let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
    assert!(matches!(
        request(&format!("GET / HTTP/1.1\r\n{many}\r\n")).0,
        Err(HeadError::TooLarge(_))
    ));
    assert!(matches!(
        request("GET / HTTP/2.0\r\n\r\n").0,
        Err(HeadError::Invalid(_))
    ));
}

#[test]
fn targets_should_be_cut_to_origin_form() {
    assert_eq!(origin_form("/a?b"), Some("/a?b"));
    assert_eq!(origin_form("http://host:1/a/b?c"), Some("/a/b?c"));
    assert_eq!(origin_form("http://host"), Some("/"));
    assert_eq!(origin_form("*"), None);
    assert_eq!(origin_form("host:443"), None);
}

fn response(raw: &str, method: &Method, relay: Relay) -> (ResponseHead, Relay, String) {
    let mut out = Vec::new();
    let mut relay = relay;
    let head = parse_response(raw.as_bytes(), method, &mut relay, &mut out)
        .unwrap()
        .unwrap();
    (head, relay, String::from_utf8(out).unwrap())
}

const KEEP: Relay = Relay {
    http10: false,
    keep_alive: true,
};

#[test]
fn a_response_head_should_be_relayed_without_hop_by_hop_headers() {
    let (head, relay, out) = response(
        "HTTP/1.1 201 Made\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nX-Kept: a\r\n\
         Content-Length: 2\r\n\r\nok",
        &Method::POST,
        KEEP,
    );
    assert_eq!((head.status, head.framing), (201, Framing::Length(2)));
    assert!(head.keep_alive && relay.keep_alive);
    assert_eq!(
        out,
        "HTTP/1.1 201 Created\r\nX-Kept: a\r\ncontent-length: 2\r\n\r\n"
    );
}

#[test]
fn response_framing_should_follow_the_method_and_status() {
    let framing = |raw: &str, method: &Method| response(raw, method, KEEP).0.framing;
    let get = &Method::GET;
    assert_eq!(
        framing(
            "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            &Method::HEAD
        ),
        Framing::Empty
    );
    assert_eq!(
        framing("HTTP/1.1 204 No Content\r\n\r\n", get),
        Framing::Empty
    );
    assert_eq!(
        framing("HTTP/1.1 100 Continue\r\n\r\n", get),
        Framing::Empty
    );
    assert_eq!(
        framing(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            get
        ),
        Framing::Chunked
    );
    assert_eq!(
        framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", get),
        Framing::UntilClose
    );
    assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n", get), Framing::UntilClose);
    let (head, _, out) = response(
        "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
        &Method::HEAD,
        KEEP,
    );
    assert!(head.keep_alive);
    assert!(out.contains("content-length: 9\r\n"), "{out}");
}

#[test]
fn bodies_until_close_and_chunked_to_http10_should_close_the_client_connection() {
    let (head, relay, out) = response("HTTP/1.1 200 OK\r\n\r\n", &Method::GET, KEEP);
    assert!(!head.keep_alive && !relay.keep_alive);
    assert!(out.ends_with("connection: close\r\n\r\n"), "{out}");
    let http10 = Relay {
        http10: true,
        keep_alive: true,
    };
    let (_, relay, out) = response(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        &Method::GET,
        http10,
    );
    assert!(!relay.keep_alive);
    assert!(!out.contains("chunked"), "{out}");
    let (_, relay, out) = response(
        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        &Method::GET,
        http10,
    );
    assert!(relay.keep_alive);
    assert!(out.ends_with("connection: keep-alive\r\n\r\n"), "{out}");
}

/// Feeds `input` in pieces split at `cuts`, returning the data and whether the end
/// was found exactly at the end of the input.
fn decode(input: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, bool), String> {
    let mut state = Chunked::default();
    let mut data = Vec::new();
    let mut at = 0;
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    bounds.push(input.len());
    bounds.sort_unstable();
    for bound in bounds {
        while at < bound {
            match state.next(&input[at..bound])? {
                Some(Piece::Data(n)) => {
                    data.extend_from_slice(&input[at..at + n]);
                    at += n;
                }
                Some(Piece::Framing(n)) => at += n,
                Some(Piece::End(n)) => {
                    at += n;
                    return Ok((data, at == input.len()));
                }
                None => unreachable!("input left"),
            }
        }
    }
    Ok((data, false))
}

#[test]
fn chunked_framing_errors_should_be_named() {
    assert!(decode(b"x\r\n", &[]).is_err());
    assert!(decode(b"3\r\nabcX", &[]).is_err());
    assert!(decode(b"3;ext\n", &[]).is_err());
    assert!(decode(b"1234567890abcdef0\r\n", &[]).is_err());
    assert_eq!(
        decode(b"3;a=b\r\nabc\r\n0\r\nT: 1\r\n\r\n", &[]),
        Ok((b"abc".to_vec(), true))
    );
    assert_eq!(decode(b"3\r\nab", &[]), Ok((b"ab".to_vec(), false)));
}

proptest! {
    #[test]
    fn chunked_bodies_should_decode_to_their_data_however_they_are_cut(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
        extension in any::<bool>(),
        trailer in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let mut input = Vec::new();
        for chunk in &chunks {
            write!(input, "{:X}{}\r\n", chunk.len(), if extension { ";name=v" } else { "" }).unwrap();
            input.extend_from_slice(chunk);
            input.extend_from_slice(b"\r\n");
        }
        input.extend_from_slice(b"0\r\n");
        if trailer {
            input.extend_from_slice(b"Checksum: 1\r\n");
        }
        input.extend_from_slice(b"\r\n");
        let (data, ended_at_end) = decode(&input, &cuts).unwrap();
        prop_assert_eq!(data, chunks.concat());
        prop_assert!(ended_at_end);
    }
}
