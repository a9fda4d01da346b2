//! HTTP/1.1 on the wire, as the proxy needs it (RFC 9112): message heads parsed with
//! `httparse`, how a body is delimited, a chunked-coding reader that tells framing
//! bytes from data without buffering, and the heads the gateway writes.

use std::io::Write as _;

use http::{Method, StatusCode};

/// Header fields in one message head at most; more is 431 (requests) or 502
/// (responses).
pub(crate) const MAX_HEADERS: usize = 100;

/// Headers that belong to one connection, not to the message (RFC 9110 §7.6.1), plus
/// the framing headers, which the gateway writes itself.
const NOT_FORWARDED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// Whether the gateway drops header `name` when forwarding: hop-by-hop (listed or
/// named by the message's `Connection` header) or framing.
pub(crate) fn not_forwarded(name: &str, connection: &[u8]) -> bool {
    NOT_FORWARDED.iter().any(|n| n.eq_ignore_ascii_case(name))
        || (!connection.is_empty() && tokens(connection).any(|t| t.eq_ignore_ascii_case(name)))
}

/// The comma-separated tokens of a header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn has_token(value: &[u8], token: &str) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

/// How a message's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// The chunked transfer coding.
    Chunked,
    /// Everything until the connection closes (responses only).
    UntilClose,
}

/// Why a message head was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// More than the allowed header fields or bytes.
    TooLarge(String),
    /// Not HTTP/1.x, or framing that cannot be trusted.
    Invalid(String),
    /// A transfer coding other than chunked.
    Unsupported(String),
}

/// A request head, with what the gateway needs from it owned (the bytes it was parsed
/// from are reused for the body).
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub(crate) method: Method,
    /// The path and query, as received (origin form; an absolute-form target is cut
    /// down to its path).
    pub(crate) target: String,
    pub(crate) http10: bool,
    /// Whether the client lets the connection stay open after this exchange.
    pub(crate) keep_alive: bool,
    pub(crate) framing: Framing,
    pub(crate) expect_continue: bool,
    /// How many `Host` headers the request has (RFC 9112 §3.2: exactly one in
    /// HTTP/1.1).
    pub(crate) hosts: u8,
    /// The head's length in the buffer.
    pub(crate) len: usize,
}

/// Limits on a request head.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadLimits {
    /// Bytes of header names and values.
    pub(crate) header_bytes: usize,
}

impl HeadLimits {
    /// The most bytes an incomplete head may take before it is refused: the header
    /// bytes, a generous request line, and the separators.
    pub(crate) fn buffered(self) -> usize {
        self.header_bytes + 8 * 1024 + 4 * MAX_HEADERS
    }
}

/// Parses the request head at the start of `buf`: `Ok(None)` while it is incomplete.
/// `forward` gets each header that is to be forwarded (neither hop-by-hop nor framing
/// nor `Host`); the host is returned for `X-Forwarded-Host`, and `X-Forwarded-For` and
/// `X-Request-Id` values go through `forward` like any other.
pub(crate) fn parse_request(
    buf: &[u8],
    limits: HeadLimits,
    mut forward: impl FnMut(&str, &[u8]),
    host: &mut Vec<u8>,
) -> Result<Option<RequestHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        // Bounded whole, however it arrived: in one read, a long request line too.
        Ok(httparse::Status::Complete(len)) if len <= limits.buffered() => len,
        Ok(httparse::Status::Complete(_) | httparse::Status::Partial)
            if buf.len() > limits.buffered() =>
        {
            return Err(HeadError::TooLarge(format!(
                "the request head exceeds {} bytes",
                limits.buffered()
            )));
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::TooLarge(format!(
                "more than {MAX_HEADERS} header fields"
            )));
        }
        Err(err) => return Err(HeadError::Invalid(format!("malformed request head: {err}"))),
    };
    if has_bare_lf(&buf[..len]) {
        return Err(HeadError::Invalid(
            "a line of the request head ends in a bare LF; lines end with CRLF".into(),
        ));
    }
    let header_bytes: usize = request
        .headers
        .iter()
        .map(|h| h.name.len() + h.value.len())
        .sum();
    if header_bytes > limits.header_bytes {
        return Err(HeadError::TooLarge(format!(
            "request headers of {header_bytes} bytes exceed the limit of {}",
            limits.header_bytes
        )));
    }
    let http10 = request.version == Some(0);
    let method = request
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or_else(|| HeadError::Invalid("malformed request method".into()))?;
    let raw_target = request.path.unwrap_or("/");
    let target = origin_form(raw_target)
        .ok_or_else(|| HeadError::Invalid(format!("unusable request target {raw_target:?}")))?
        .to_owned();

    let delimiting = Delimiting::scan(request.headers)?;
    let framing = delimiting.request_framing(http10)?;
    let mut expect_continue = false;
    let mut hosts = 0u8;
    for header in request.headers.iter() {
        let name = header.name;
        if name.contains('_') {
            // `Content_Length` and the like mean nothing here, and an upstream that
            // reads `_` as `-` would frame the request differently: dropped, as nginx
            // does by default.
            continue;
        }
        if name.eq_ignore_ascii_case("expect") {
            expect_continue = header
                .value
                .trim_ascii()
                .eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("host") {
            hosts = hosts.saturating_add(1);
            host.clear();
            host.extend_from_slice(header.value);
        } else if !not_forwarded(name, delimiting.connection) {
            forward(name, header.value);
        }
    }
    let keep_alive = delimiting.keep_alive(http10);
    Ok(Some(RequestHead {
        method,
        target,
        http10,
        keep_alive,
        framing,
        expect_continue,
        hosts,
        len,
    }))
}

/// Whether a line of `head` ends in a LF with no CR before it.
fn has_bare_lf(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .any(|(at, &byte)| byte == b'\n' && (at == 0 || head[at - 1] != b'\r'))
}

/// The path and query of a request target: origin form as is, absolute form cut down
/// to its path (`/` if it has none). Anything else (`*`, authority form) has none.
fn origin_form(target: &str) -> Option<&str> {
    if target.starts_with('/') {
        return Some(target);
    }
    let (scheme, rest) = target.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    Some(rest.find('/').map_or("/", |at| &rest[at..]))
}

fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// What a message's headers say about its delimiting and its connection.
struct Delimiting<'h> {
    /// The `Connection` header's value (empty without one).
    connection: &'h [u8],
    /// The `Content-Length`, the same in every such header.
    length: Option<u64>,
    /// `Transfer-Encoding` headers, and the last one's value.
    codings: usize,
    last_coding: &'h [u8],
}

impl<'h> Delimiting<'h> {
    /// How a request with these headers is framed (RFC 9112 §6.3), or why it cannot
    /// be trusted: both a length and a coding, a coding in HTTP/1.0, a coding other
    /// than chunked.
    fn request_framing(&self, http10: bool) -> Result<Framing, HeadError> {
        let chunked = self.codings > 0;
        if chunked && http10 {
            return Err(HeadError::Invalid(
                "transfer-encoding in an HTTP/1.0 request".into(),
            ));
        }
        if chunked
            && (self.codings > 1
                || !self
                    .last_coding
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"chunked"))
        {
            return Err(HeadError::Unsupported(
                "only the chunked transfer coding is supported".into(),
            ));
        }
        if chunked && self.length.is_some() {
            return Err(HeadError::Invalid(
                "both content-length and transfer-encoding".into(),
            ));
        }
        Ok(match (chunked, self.length) {
            (true, _) => Framing::Chunked,
            (false, Some(n)) => Framing::Length(n),
            (false, None) => Framing::Empty,
        })
    }

    fn scan(headers: &[httparse::Header<'h>]) -> Result<Self, HeadError> {
        let mut found = Self {
            connection: &[],
            length: None,
            codings: 0,
            last_coding: &[],
        };
        for header in headers {
            let name = header.name;
            if name.eq_ignore_ascii_case("connection") {
                found.connection = header.value;
            } else if name.eq_ignore_ascii_case("content-length") {
                let value = parse_length(header.value)
                    .ok_or_else(|| HeadError::Invalid("malformed content-length".into()))?;
                if found.length.is_some_and(|earlier| earlier != value) {
                    return Err(HeadError::Invalid(
                        "conflicting content-length values".into(),
                    ));
                }
                found.length = Some(value);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                found.codings += 1;
                found.last_coding = header.value;
            }
        }
        Ok(found)
    }

    /// Whether the connection stays open after the message: by default in HTTP/1.1,
    /// only when asked in HTTP/1.0.
    fn keep_alive(&self, http10: bool) -> bool {
        if http10 {
            has_token(self.connection, "keep-alive")
        } else {
            !has_token(self.connection, "close")
        }
    }
}

/// A response head from an upstream.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) status: u16,
    /// How the body that follows is delimited.
    pub(crate) framing: Framing,
    /// Whether the upstream keeps the connection open after this response.
    pub(crate) keep_alive: bool,
    /// The head's length in the buffer.
    pub(crate) len: usize,
}

/// How the gateway frames the response it sends on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Relay {
    /// The client spoke HTTP/1.0 (no chunked coding; keep-alive said explicitly).
    pub(crate) http10: bool,
    /// The client connection stays open after this response.
    pub(crate) keep_alive: bool,
}

/// Parses the response head at the start of `buf` (`Ok(None)` while incomplete) for a
/// request with `method`, and writes the head the client gets into `out`: the same
/// status and headers, hop-by-hop ones removed, framing for `relay`. Returns the head
/// and the framing the client gets (which differs from the upstream's when the
/// upstream's cannot be sent on: chunked to an HTTP/1.0 client is sent as data until
/// close).
pub(crate) fn parse_response(
    buf: &[u8],
    method: &Method,
    relay: &mut Relay,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > 64 * 1024 => {
            return Err(HeadError::TooLarge(
                "the response head exceeds 64 KiB".into(),
            ));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => {
            return Err(HeadError::Invalid(format!(
                "malformed response head: {err}"
            )));
        }
    };
    let status = response.code.unwrap_or(0);
    let http10 = response.version == Some(0);
    let delimiting = Delimiting::scan(response.headers)?;
    let connection = delimiting.connection;
    let length = delimiting.length;
    let bodiless = *method == Method::HEAD || status < 200 || status == 204 || status == 304;
    let framing = if bodiless {
        Framing::Empty
    } else if delimiting.codings > 0 {
        // Chunked must be the last coding; the others stay in the data.
        let chunked = tokens(delimiting.last_coding)
            .last()
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let keep_alive = framing != Framing::UntilClose && delimiting.keep_alive(http10);
    let head = ResponseHead {
        status,
        framing,
        keep_alive,
        len,
    };
    if status < 200 {
        // Interim: the caller skips it.
        return Ok(Some(head));
    }

    // The head the client gets.
    out.clear();
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .or(response.reason)
        .unwrap_or("");
    let _ = write!(out, "HTTP/1.1 {status} {reason}\r\n");
    for header in response.headers.iter() {
        if !not_forwarded(header.name, connection) {
            put_header(out, header.name.as_bytes(), header.value);
        }
    }
    match framing {
        Framing::Empty => {
            // A HEAD or 304 response tells the length the body would have.
            if status != 204
                && let Some(n) = length
            {
                let _ = write!(out, "content-length: {n}\r\n");
            }
        }
        Framing::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Framing::Chunked if !relay.http10 => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n")
        }
        // Chunked to HTTP/1.0, or until close: the client reads until close.
        Framing::Chunked | Framing::UntilClose => relay.keep_alive = false,
    }
    connection_header(out, *relay);
    out.extend_from_slice(b"\r\n");
    Ok(Some(head))
}

/// Ends a head with the `Connection` header the client needs, if any.
fn connection_header(out: &mut Vec<u8>, relay: Relay) {
    if !relay.keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if relay.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
}

/// Appends `name: value\r\n`.
pub(crate) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes a whole response of the gateway's own (an error) into `out`.
pub(crate) fn own_response(
    out: &mut Vec<u8>,
    status: StatusCode,
    content_type: &str,
    body: &[u8],
    relay: Relay,
) {
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    connection_header(out, relay);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

pub(crate) use crate::chunked::{Chunked, Piece};

#[cfg(test)]
#[path = "http1_tests.rs"]
mod tests;
