//! The ACL over gRPC and HTTP: who may produce to and consume from which topics,
//! and a reload that takes effect on open connections without dropping them.

use std::path::Path;
use std::time::{Duration, Instant};

use keel_proto::log::v1 as wire;
use keel_proto::log::v1::log_client::LogClient;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::support::{TestServer, config};

/// Alice produces to and consumes `logs`; bob only consumes it; anonymous callers
/// may only consume `public`.
fn write_acl(file: &Path, alice_topics: &str) {
    let mut text = String::new();
    for principal in ["alice", "bob"] {
        text.push_str(&keel_auth::token::acl_entry(
            principal,
            &format!("{principal}-token"),
        ));
    }
    text.push_str(&format!(
        r#"
[[allow]]
principals = ["alice"]
topics = [{alice_topics}]
actions = ["produce", "consume"]

[[allow]]
principals = ["bob"]
topics = ["logs"]
actions = ["consume"]

[[allow]]
principals = ["anonymous"]
topics = ["public"]
actions = ["consume"]
"#
    ));
    std::fs::write(file, text).unwrap();
}

/// Adds the caller's `authorization` to every call.
type AddToken =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

type Authorized = LogClient<InterceptedService<Channel, AddToken>>;

async fn grpc(server: &TestServer, token: Option<&str>) -> Authorized {
    let channel = Channel::from_shared(server.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
        token.map(|token| format!("Bearer {token}-token").parse().unwrap());
    let add: AddToken = Box::new(move |mut request| {
        if let Some(bearer) = &bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        Ok(request)
    });
    LogClient::with_interceptor(channel, add)
}

fn produce(topic: &str) -> wire::ProduceRequest {
    wire::ProduceRequest {
        topic: topic.into(),
        record: Some(wire::Record {
            value: b"v".to_vec().into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn consume(topic: &str) -> wire::ConsumeRequest {
    wire::ConsumeRequest {
        topic: topic.into(),
        offset: 0,
        ..Default::default()
    }
}

async fn start(dir: &Path) -> TestServer {
    let file = dir.join("acl.toml");
    write_acl(&file, "\"logs\"");
    let mut config = config(&dir.join("data"));
    config.acl = Some(file);
    TestServer::start_with(config).await
}

#[tokio::test]
async fn each_topic_action_should_be_allowed_or_denied_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut alice = grpc(&server, Some("alice")).await;
    let mut bob = grpc(&server, Some("bob")).await;
    let mut nobody = grpc(&server, None).await;
    let mut guessed = grpc(&server, Some("guessed")).await;

    fn code<T>(result: Result<T, tonic::Status>) -> Code {
        result.map(drop).unwrap_err().code()
    }
    alice
        .produce(produce("logs"))
        .await
        .expect("alice produces to logs");
    alice
        .consume(consume("logs"))
        .await
        .expect("alice consumes logs");
    bob.consume(consume("logs"))
        .await
        .expect("bob consumes logs");
    assert_eq!(
        code(bob.produce(produce("logs")).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(alice.produce(produce("secret")).await),
        Code::PermissionDenied
    );
    let batch = wire::ProduceBatchRequest {
        topic: "logs".into(),
        values: vec![b"x".to_vec().into()],
        ..Default::default()
    };
    assert_eq!(code(bob.produce_batch(batch).await), Code::PermissionDenied);
    assert_eq!(
        code(nobody.produce(produce("logs")).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(guessed.consume(consume("logs")).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(nobody.consume(consume("logs")).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(bob.list_topics(wire::ListTopicsRequest {}).await),
        Code::PermissionDenied
    );
    // Streams: refused at once, or at the first request to a topic not allowed.
    assert_eq!(
        code(bob.consume_stream(consume("secret")).await),
        Code::PermissionDenied
    );
    let mut stream = bob
        .produce_stream(futures::stream::iter([produce("logs")]))
        .await
        .expect("the stream opens")
        .into_inner();
    let first = stream.message().await.unwrap_err();
    assert_eq!(first.code(), Code::PermissionDenied);

    // Nothing refused was written: one record in logs, no topic `secret`.
    let next = alice
        .consume(wire::ConsumeRequest {
            offset: 1,
            ..consume("logs")
        })
        .await;
    assert_eq!(next.unwrap_err().code(), Code::OutOfRange);
    let secret = alice.consume(consume("secret")).await;
    assert_eq!(secret.unwrap_err().code(), Code::PermissionDenied);
}

#[tokio::test]
async fn each_topic_action_should_be_allowed_or_denied_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let http = keel_serve::client::new();
    let post = |topic: &str, token: Option<&str>| {
        let mut request = http
            .post(server.url(&format!("/v1/topics/{topic}/records")))
            .header("content-type", "application/octet-stream")
            .body("v");
        if let Some(token) = token {
            request = request.bearer_auth(format!("{token}-token"));
        }
        request.send()
    };
    assert_eq!(post("logs", Some("alice")).await.unwrap().status(), 200);
    let denied = post("logs", Some("bob")).await.unwrap();
    assert_eq!(denied.status(), 403);
    let body: serde_json::Value = denied.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
    let unauthenticated = post("logs", None).await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let body: serde_json::Value = unauthenticated.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthenticated", "{body}");
    assert_eq!(post("logs", Some("guessed")).await.unwrap().status(), 401);

    let get = |path: &str, token: Option<&str>| {
        let mut request = http.get(server.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(format!("{token}-token"));
        }
        request.send()
    };
    assert_eq!(
        get("/v1/topics/logs/records/0", Some("bob"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        get("/v1/topics/logs/records?from=0", None)
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        get("/v1/topics/logs/tail", Some("guessed"))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        get("/v1/topics", Some("alice")).await.unwrap().status(),
        403
    );
    // The sink and the original contract are topics like any other.
    let sink = http
        .post(server.url("/log"))
        .body("a line")
        .send()
        .await
        .unwrap();
    assert_eq!(sink.status(), 401);
    let original = http
        .post(server.url("/"))
        .json(&serde_json::json!({"record": {"value": "aGk="}}))
        .send()
        .await
        .unwrap();
    assert_eq!(original.status(), 401);
    // The metrics count the decisions.
    let metrics = get("/metrics", None).await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("keel_auth_decisions_total{decision=\"forbidden\"}"),
        "{metrics}"
    );
}

/// A changed ACL takes effect within seconds, on connections already open, and
/// those connections stay open for what is still allowed.
#[tokio::test]
async fn an_acl_reload_should_take_effect_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut alice = grpc(&server, Some("alice")).await;
    alice.produce(produce("logs")).await.expect("allowed");
    write_acl(&dir.path().join("acl.toml"), "\"other\"");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match alice.produce(produce("logs")).await {
            Err(status) if status.code() == Code::PermissionDenied => break,
            Ok(_) => assert!(Instant::now() < deadline, "the reload was not picked up"),
            Err(other) => panic!("{other}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The same client, on the same connection, for what the new ACL allows.
    alice
        .produce(produce("other"))
        .await
        .expect("allowed by the new ACL");
}
