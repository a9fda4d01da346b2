//! Tests of `channel.rs`.

use super::*;

/// An HTTP/2 server on 127.0.0.1 that answers every request with `status`,
/// `body` as one data frame, and one trailer if given.
async fn misbehaving_server(
    status: u16,
    body: &'static [u8],
    trailers: Option<(&'static str, &'static str)>,
) -> Target {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut connection = h2::server::handshake(tcp).await.unwrap();
        while let Some(Ok((_request, mut respond))) = connection.accept().await {
            let response = http::Response::builder().status(status).body(()).unwrap();
            let mut send = respond.send_response(response, false).unwrap();
            send.send_data(Bytes::from_static(body), trailers.is_none())
                .unwrap();
            if let Some((name, value)) = trailers {
                let mut map = http::HeaderMap::new();
                map.insert(name, http::HeaderValue::from_static(value));
                send.send_trailers(map).unwrap();
            }
        }
    });
    Target::parse(&addr.to_string()).unwrap()
}

async fn produce_against(target: &Target) -> Status {
    let mut channel = Channel::connect(target, Duration::from_secs(5), &Credentials::default())
        .await
        .unwrap();
    let request = keel_proto::log::v1::ProduceRequest::default();
    channel
        .unary::<_, keel_proto::log::v1::ProduceResponse>(target, "/log.v1.Log/Produce", &request)
        .await
        .unwrap_err()
}

#[tokio::test]
async fn answers_that_are_not_grpc_should_get_a_clear_status() {
    // A proxy's 503 page, without any gRPC status: unavailable, saying so.
    let status = produce_against(&misbehaving_server(503, b"busy", None).await).await;
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("HTTP 503"),
        "{}",
        status.message()
    );

    // A 200 whose message is cut short, then an OK status: malformed.
    let status = produce_against(
        &misbehaving_server(200, &[0, 0, 0, 0, 9, 8], Some(("grpc-status", "0"))).await,
    )
    .await;
    assert_eq!(status.code(), Code::Internal);
    assert!(status.message().contains("length"), "{}", status.message());

    // The service's own error status comes through as it is.
    let status =
        produce_against(&misbehaving_server(200, b"", Some(("grpc-status", "8"))).await).await;
    assert_eq!(status.code(), Code::ResourceExhausted);
}

#[test]
fn targets_should_parse_host_port_and_http_urls() {
    let target = Target::parse("127.0.0.1:9").unwrap();
    assert_eq!(target.authority, "127.0.0.1:9");
    assert_eq!(target.origin.to_string(), "http://127.0.0.1:9/");
    let target = Target::parse("http://localhost:8080/").unwrap();
    assert_eq!(target.authority, "localhost:8080");
    assert_eq!(
        Target::parse("http://localhost").unwrap().authority,
        "localhost:80"
    );
}

#[test]
fn unary_responses_should_decode_or_say_what_is_wrong() {
    use keel_proto::log::v1::ProduceResponse;
    let mut good = vec![0, 0, 0, 0, 2];
    good.extend_from_slice(&[0x08, 0x07]); // offset = 7
    let decoded: ProduceResponse = decode_message(&good).unwrap();
    assert_eq!(decoded.offset, 7);
    for (bad, says) in [
        (&[0u8, 0, 0][..], "no message"),
        (&[1, 0, 0, 0, 0][..], "compressed"),
        (&[0, 0, 0, 0, 9, 0x08][..], "length"),
    ] {
        let err = decode_message::<ProduceResponse>(bad).unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.message().contains(says), "{}", err.message());
    }
}

#[test]
fn a_status_with_broken_details_should_still_be_read() {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
    trailers.insert(
        "grpc-message",
        http::HeaderValue::from_static("disk%20full"),
    );
    trailers.insert(
        "grpc-status-details-bin",
        http::HeaderValue::from_static("not base64!"),
    );
    let status = grpc_status(&trailers).unwrap();
    assert_eq!(
        (status.code(), status.message()),
        (Code::Internal, "disk full")
    );
    assert!(grpc_status(&http::HeaderMap::new()).is_none());
}

#[test]
fn http_errors_without_a_grpc_status_should_map_as_grpc_does() {
    assert_eq!(
        code_of_http_status(http::StatusCode::SERVICE_UNAVAILABLE),
        Code::Unavailable
    );
    assert_eq!(
        code_of_http_status(http::StatusCode::NOT_FOUND),
        Code::Unimplemented
    );
    assert_eq!(code_of_http_status(http::StatusCode::OK), Code::Unknown);
}

#[test]
fn method_uris_should_be_absolute() {
    let target = Target::parse("127.0.0.1:9").unwrap();
    assert_eq!(
        target.uri("/log.v1.Log/Produce").to_string(),
        "http://127.0.0.1:9/log.v1.Log/Produce"
    );
}

#[test]
fn targets_should_refuse_other_schemes_and_paths() {
    assert!(
        Target::parse("ftp://localhost:1")
            .unwrap_err()
            .contains("http://")
    );
    let tls = Target::parse("https://localhost").unwrap();
    assert_eq!(
        (tls.authority.as_str(), tls.tls),
        ("localhost:443", Some(true))
    );
    assert_eq!(Target::parse("localhost:9").unwrap().tls, None);
    assert!(
        Target::parse("http://localhost:1/v1")
            .unwrap_err()
            .contains("path")
    );
    assert!(Target::parse("http://").is_err());
}
