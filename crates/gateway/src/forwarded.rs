//! The head a request is forwarded with: the client's headers (hop-by-hop ones
//! already dropped by the parser), the `X-Forwarded-*` headers, a request id, and
//! framing for the body as it is sent on. Pure: buffers in, bytes out.

use std::io::Write as _;
use std::net::IpAddr;

use crate::http1::{Framing, RequestHead, put_header};
use crate::route::Route;

/// A request's headers as they are forwarded, built while its head is parsed and
/// completed once it is routed. Its buffers are reused by each request of a
/// connection.
#[derive(Debug, Default)]
pub(crate) struct Forwarded {
    /// The header lines forwarded, the gateway's own included once completed.
    headers: Vec<u8>,
    /// The `X-Forwarded-For` the client sent, if any.
    forwarded_for: Vec<u8>,
    has_request_id: bool,
    /// The `Host` the client sent, if any: the parser fills it in.
    pub(crate) host: Vec<u8>,
}

/// How the body goes upstream: with a length, or chunked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    /// No body.
    None,
    /// `Content-Length` of this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

impl BodyFraming {
    /// How a body of `framing` is sent on when it streams (`buffered` is `None`) or
    /// was read whole into `buffered` bytes.
    pub(crate) fn of(framing: Framing, buffered: Option<usize>) -> Self {
        match (framing, buffered) {
            (Framing::Empty, _) => Self::None,
            (_, Some(len)) => Self::Length(len as u64),
            (Framing::Length(len), None) => Self::Length(len),
            (Framing::Chunked | Framing::UntilClose, None) => Self::Chunked,
        }
    }
}

impl Forwarded {
    /// Forgets the previous request.
    pub(crate) fn clear(&mut self) {
        self.headers.clear();
        self.forwarded_for.clear();
        self.host.clear();
        self.has_request_id = false;
    }

    /// Takes one header of the client's request: `X-Forwarded-For` is kept to be
    /// extended; `X-Forwarded-Proto`, `-Host` and `-Prefix` and `Forwarded` are dropped,
    /// so that what the instance reads in them is the gateway's word, never the
    /// client's; the rest is forwarded as sent.
    pub(crate) fn take(&mut self, name: &str, value: &[u8]) {
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            if !self.forwarded_for.is_empty() {
                self.forwarded_for.extend_from_slice(b", ");
            }
            self.forwarded_for.extend_from_slice(value);
        } else if !name.eq_ignore_ascii_case("x-forwarded-proto")
            && !name.eq_ignore_ascii_case("x-forwarded-host")
            && !name.eq_ignore_ascii_case("x-forwarded-prefix")
            && !name.eq_ignore_ascii_case("forwarded")
        {
            self.has_request_id |= name.eq_ignore_ascii_case("x-request-id");
            put_header(&mut self.headers, name.as_bytes(), value);
        }
    }

    /// Adds the gateway's headers for a request from `peer` (over TLS when `https`)
    /// with `id`, routed by `route`, whose body goes upstream framed as `body`, and the
    /// blank line.
    pub(crate) fn complete(
        &mut self,
        (peer, https): (IpAddr, bool),
        id: u64,
        route: &Route,
        body: BodyFraming,
    ) {
        let headers = &mut self.headers;
        headers.extend_from_slice(b"x-forwarded-for: ");
        if !self.forwarded_for.is_empty() {
            headers.extend_from_slice(&self.forwarded_for);
            headers.extend_from_slice(b", ");
        }
        let proto = if https { "https" } else { "http" };
        let _ = write!(headers, "{peer}\r\nx-forwarded-proto: {proto}\r\n");
        if !self.host.is_empty() {
            put_header(headers, b"x-forwarded-host", &self.host);
        }
        if !self.has_request_id {
            let _ = write!(headers, "x-request-id: {id:016x}\r\n");
        }
        if route.stripped {
            // Lets the instance build links that go back through the gateway.
            let _ = write!(headers, "x-forwarded-prefix: /{}\r\n", route.service);
        }
        match body {
            BodyFraming::None => {}
            BodyFraming::Length(len) => {
                let _ = write!(headers, "content-length: {len}\r\n");
            }
            BodyFraming::Chunked => headers.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
        headers.extend_from_slice(b"\r\n");
    }

    /// Writes into `out` the whole head for the instance at `authority` with base
    /// path `base_path`: an origin-form request line and an explicit `Host` (the
    /// connection is to the instance itself, not through a proxy), then the completed
    /// headers.
    pub(crate) fn write_head(
        &self,
        head: &RequestHead,
        route: &Route,
        (authority, base_path): (&str, &str),
        out: &mut Vec<u8>,
    ) {
        out.clear();
        out.extend_from_slice(head.method.as_str().as_bytes());
        out.push(b' ');
        if !base_path.is_empty() {
            out.push(b'/');
            out.extend_from_slice(base_path.trim_end_matches('/').as_bytes());
        }
        route.write_target(&head.target, out);
        let _ = write!(out, " HTTP/1.1\r\nhost: {authority}\r\n");
        out.extend_from_slice(&self.headers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(stripped: bool) -> Route {
        Route {
            service: "svc".into(),
            stripped,
        }
    }

    fn completed(sent: &[(&str, &str)], route: &Route, body: BodyFraming) -> String {
        let mut forwarded = Forwarded::default();
        for (name, value) in sent {
            forwarded.take(name, value.as_bytes());
        }
        forwarded.complete(("10.0.0.9".parse().unwrap(), false), 0xab, route, body);
        String::from_utf8(forwarded.headers).unwrap()
    }

    #[test]
    fn the_client_address_should_be_appended_to_x_forwarded_for() {
        let headers = completed(
            &[
                ("X-Forwarded-For", "1.1.1.1"),
                ("x-forwarded-for", "2.2.2.2"),
            ],
            &route(false),
            BodyFraming::None,
        );
        assert!(
            headers.starts_with("x-forwarded-for: 1.1.1.1, 2.2.2.2, 10.0.0.9\r\n"),
            "{headers}"
        );
        assert!(headers.contains("x-forwarded-proto: http\r\n"));
        assert!(headers.ends_with("\r\n\r\n"));
    }

    #[test]
    fn a_request_id_should_be_added_only_when_the_client_sent_none() {
        let added = completed(&[], &route(false), BodyFraming::None);
        assert!(
            added.contains("x-request-id: 00000000000000ab\r\n"),
            "{added}"
        );
        let kept = completed(
            &[("X-Request-Id", "mine")],
            &route(false),
            BodyFraming::None,
        );
        assert!(kept.contains("X-Request-Id: mine\r\n"), "{kept}");
        assert!(!kept.contains("00000000000000ab"), "{kept}");
    }

    #[test]
    fn forwarded_proto_and_host_from_the_client_should_be_dropped() {
        let headers = completed(
            &[("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "evil")],
            &route(false),
            BodyFraming::None,
        );
        assert!(
            !headers.contains("https") && !headers.contains("evil"),
            "{headers}"
        );
    }

    #[test]
    fn a_stripped_prefix_should_be_announced_and_the_clients_forwarding_headers_dropped() {
        let sent = [("X-Forwarded-Prefix", "/old"), ("Forwarded", "for=1.2.3.4")];
        let stripped = completed(&sent, &route(true), BodyFraming::None);
        assert!(
            stripped.contains("x-forwarded-prefix: /svc\r\n"),
            "{stripped}"
        );
        assert!(!stripped.contains("/old"), "{stripped}");
        let plain = completed(&sent, &route(false), BodyFraming::None);
        assert!(
            !plain.to_ascii_lowercase().contains("forwarded-prefix")
                && !plain.contains("for=1.2.3.4"),
            "{plain}"
        );
    }

    #[test]
    fn the_body_framing_should_match_how_the_body_is_sent() {
        assert!(
            completed(&[], &route(false), BodyFraming::Length(5)).contains("content-length: 5\r\n")
        );
        assert!(
            completed(&[], &route(false), BodyFraming::Chunked)
                .contains("transfer-encoding: chunked\r\n")
        );
        assert_eq!(
            BodyFraming::of(Framing::Chunked, Some(3)),
            BodyFraming::Length(3)
        );
        assert_eq!(
            BodyFraming::of(Framing::Length(9), None),
            BodyFraming::Length(9)
        );
        assert_eq!(BodyFraming::of(Framing::Empty, Some(0)), BodyFraming::None);
    }
}
