//! The gRPC API: every RPC and every error code.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use keel_log::{Client, ClientError};
use keel_proto::log::v1 as wire;
use tonic::Code;

use crate::support::{TestServer, config};

fn status_of(err: ClientError) -> (Code, String) {
    match err {
        ClientError::Status(status) => (status.code(), status.message().to_owned()),
        other => panic!("expected a status, got {other}"),
    }
}

#[tokio::test]
async fn produce_then_consume_should_round_trip_on_the_default_topic() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    assert_eq!(client.produce("", "hello").await.unwrap(), 0);
    assert_eq!(client.produce("", "world").await.unwrap(), 1);
    let record = client.consume("", 1).await.unwrap();
    assert_eq!((record.offset, &record.value[..]), (1, &b"world"[..]));
    assert!(record.timestamp_ms > 0);
}

#[tokio::test]
async fn consume_past_the_end_should_be_out_of_range_naming_offset_and_range() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client.produce("", "only").await.unwrap();
    let (code, message) = status_of(client.consume("", 7).await.unwrap_err());
    assert_eq!(code, Code::OutOfRange);
    assert!(
        message.contains("offset 7") && message.contains("0..1"),
        "{message}"
    );
}

#[tokio::test]
async fn topics_should_be_separate_logs_created_on_first_write() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    assert_eq!(client.produce("orders", "o1").await.unwrap(), 0);
    assert_eq!(client.produce("payments", "p1").await.unwrap(), 0);
    assert_eq!(client.produce("orders", "o2").await.unwrap(), 1);
    assert_eq!(&client.consume("orders", 1).await.unwrap().value[..], b"o2");
    let topics = client.topics().await.unwrap();
    let names: Vec<&str> = topics.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["default", "logs", "orders", "payments"]);
    assert_eq!(topics[2].next_offset, 2);
}

#[tokio::test]
async fn errors_should_map_to_precise_codes() {
    let dir = tempfile::tempdir().unwrap();
    let strict = keel_log::LogServiceConfig {
        auto_create_topics: false,
        ..config(dir.path())
    };
    let server = TestServer::start_with(strict).await;
    let mut client = server.client().await;

    let (code, message) = status_of(client.produce("nope", "x").await.unwrap_err());
    assert_eq!(code, Code::NotFound, "{message}");
    let (code, message) = status_of(client.consume("bad/name", 0).await.unwrap_err());
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(message.contains("bad/name"));
    let (code, message) = status_of(
        client
            .produce("", vec![0u8; 1024 * 1024 + 1])
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("larger than the limit"), "{message}");
    let status = client
        .grpc()
        .produce(wire::ProduceRequest {
            record: None,
            topic: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn empty_and_512_kib_records_should_round_trip() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let big: Vec<u8> = (0..512 * 1024).map(|i| (i % 251) as u8).collect();
    assert_eq!(client.produce("", Bytes::new()).await.unwrap(), 0);
    assert_eq!(client.produce("", big.clone()).await.unwrap(), 1);
    assert!(client.consume("", 0).await.unwrap().value.is_empty());
    assert_eq!(client.consume("", 1).await.unwrap().value, big);
}

#[tokio::test]
async fn concurrent_producers_on_several_serving_threads_should_get_unique_dense_offsets() {
    // Three serving threads whatever the machine: the eight connections land on
    // different threads, which share the topic and its writer.
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(keel_log::LogServiceConfig {
        workers: 3,
        ..crate::support::config(dir.path())
    })
    .await;
    let mut tasks = Vec::new();
    for producer in 0..8 {
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            for i in 0..200 {
                offsets.push(
                    client
                        .produce("", format!("p{producer}-{i}"))
                        .await
                        .unwrap(),
                );
            }
            offsets
        }));
    }
    let mut all = HashSet::new();
    for task in tasks {
        for offset in task.await.unwrap() {
            assert!(all.insert(offset), "offset {offset} given twice");
        }
    }
    assert_eq!(all.len(), 1600);
    assert_eq!(all.iter().max(), Some(&1599), "offsets are dense");
    let mut client = server.client().await;
    let mut seen = HashSet::new();
    for offset in 0..1600 {
        let value = client.consume("", offset).await.unwrap().value;
        assert!(seen.insert(value), "every record is kept once");
    }
}

#[tokio::test]
async fn produce_batch_should_return_the_range_and_keep_order() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client.produce("t", "first").await.unwrap();
    let values: Vec<Bytes> = (0..100).map(|i| Bytes::from(format!("v{i}"))).collect();
    assert_eq!(client.produce_batch("t", values).await.unwrap(), 1..101);
    assert_eq!(&client.consume("t", 50).await.unwrap().value[..], b"v49");
}

/// Sends `values` on one ProduceStream to `topic`, checks that the answers come in
/// order with offsets from 0, and returns how many came.
async fn produce_stream_in_order(client: &mut Client, topic: &str, values: Vec<Bytes>) -> u64 {
    let topic = topic.to_owned();
    let requests =
        futures::stream::iter(values.into_iter().map(move |value| wire::ProduceRequest {
            record: Some(wire::Record {
                value,
                ..Default::default()
            }),
            topic: topic.clone(),
            ..Default::default()
        }));
    let mut responses = client
        .grpc()
        .produce_stream(requests)
        .await
        .unwrap()
        .into_inner();
    let mut acked = 0;
    while let Some(response) = responses.next().await {
        assert_eq!(response.unwrap().offset, acked);
        acked += 1;
    }
    acked
}

#[tokio::test]
async fn produce_stream_should_answer_each_record_in_order() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let values = (0..500).map(|i| Bytes::from(format!("s{i}"))).collect();
    assert_eq!(
        produce_stream_in_order(&mut client, "stream", values).await,
        500
    );
    assert_eq!(
        &client.consume("stream", 499).await.unwrap().value[..],
        b"s499"
    );
}

#[tokio::test]
async fn a_produce_stream_larger_than_every_window_should_arrive_whole() {
    // 48 records of 512 KiB: 24 MiB on one stream, far past the HTTP/2 flow-control
    // windows, so the client must wait for window updates as it sends.
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let values = (0..48u8)
        .map(|i| Bytes::from(vec![i; 512 * 1024]))
        .collect();
    assert_eq!(
        produce_stream_in_order(&mut client, "big", values).await,
        48
    );
    for i in [0u8, 23, 47] {
        let value = client.consume("big", u64::from(i)).await.unwrap().value;
        assert!(value.len() == 512 * 1024 && value.iter().all(|&b| b == i));
    }
}

#[tokio::test]
async fn a_client_should_connect_again_after_the_service_restarts() {
    let mut server = TestServer::start().await;
    let addr = server.addr;
    let mut client = server.client().await;
    assert_eq!(client.produce("again", "before").await.unwrap(), 0);
    server.stop().await;
    let dir = server.take_dir();
    let _server = TestServer::start_on(addr, config(dir.path())).await;
    // The call that finds the old connection broken fails as unavailable; one of
    // the next ones connects again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let offset = loop {
        match client.produce("again", "after").await {
            Ok(offset) => break offset,
            Err(ClientError::Status(status)) if status.code() == Code::Unavailable => {
                assert!(tokio::time::Instant::now() < deadline, "never reconnected");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    };
    assert_eq!(offset, 1);
    assert_eq!(
        &client.consume("again", 0).await.unwrap().value[..],
        b"before"
    );
}

#[tokio::test]
async fn consume_stream_should_replay_then_tail_promptly_then_end_on_cancel() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for i in 0..3 {
        client.produce("", format!("old{i}")).await.unwrap();
    }
    let mut stream = client
        .grpc()
        .consume_stream(wire::ConsumeRequest {
            offset: 1,
            topic: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for expected in 1..3 {
        let record = stream.next().await.unwrap().unwrap().record.unwrap();
        assert_eq!(record.offset, expected);
    }
    // Caught up: the stream waits. A new record must arrive promptly, woken by the
    // append (the deadline is generous; an event-driven tail takes milliseconds).
    let mut producer = server.client().await;
    let produced = tokio::spawn(async move { producer.produce("", "new").await.unwrap() });
    let record = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the tail delivers a new record without polling")
        .unwrap()
        .unwrap()
        .record
        .unwrap();
    assert_eq!((record.offset, &record.value[..]), (3, &b"new"[..]));
    assert_eq!(produced.await.unwrap(), 3);
    drop(stream);
    // The server is still healthy after the client went away.
    assert_eq!(client.produce("", "after").await.unwrap(), 4);
}

#[tokio::test]
async fn consume_stream_from_a_future_offset_should_wait_for_it() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut stream = client
        .grpc()
        .consume_stream(wire::ConsumeRequest {
            offset: 2,
            topic: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut producer = server.client().await;
    for i in 0..3 {
        producer.produce("", format!("r{i}")).await.unwrap();
    }
    let record = stream.next().await.unwrap().unwrap().record.unwrap();
    assert_eq!(
        record.offset, 2,
        "the original ConsumeStream waits for an offset not written yet"
    );
}

#[tokio::test]
async fn batched_stream_should_respect_the_budget_and_follow() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let values: Vec<Bytes> = (0..1000).map(|_| Bytes::from(vec![7u8; 100])).collect();
    client.produce_batch("b", values).await.unwrap();
    let mut stream = client.subscribe("b", 0, false, 10_000).await.unwrap();
    let mut total = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert!(
            !chunk.is_empty() && chunk.len() <= 100,
            "{} records in a 10 kB budget",
            chunk.len()
        );
        assert_eq!(chunk[0].offset, total);
        total += chunk.len() as u64;
    }
    assert_eq!(total, 1000, "without follow the stream ends at the end");

    let mut follow = client.subscribe("b", 1000, true, 0).await.unwrap();
    client.produce("b", "live").await.unwrap();
    let chunk = tokio::time::timeout(Duration::from_secs(5), follow.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((chunk[0].offset, &chunk[0].value[..]), (1000, &b"live"[..]));
}

#[tokio::test]
async fn restart_should_keep_every_acknowledged_record() {
    let mut server = TestServer::start().await;
    let mut client = server.client().await;
    for i in 0..50 {
        assert_eq!(client.produce("keep", format!("k{i}")).await.unwrap(), i);
    }
    server.stop().await;
    let dir = server.take_dir();
    let server = TestServer::start_with(config(dir.path())).await;
    let mut client = server.client().await;
    for i in 0..50 {
        assert_eq!(
            client.consume("keep", i).await.unwrap().value,
            format!("k{i}")
        );
    }
    assert_eq!(client.produce("keep", "next").await.unwrap(), 50);
}

#[tokio::test]
async fn shutdown_should_end_open_tails_and_stop_within_the_grace_period() {
    let mut server = TestServer::start().await;
    let mut client = server.client().await;
    let mut stream = client
        .grpc()
        .consume_stream(wire::ConsumeRequest {
            offset: 0,
            topic: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    server.stop().await;
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the stream ends");
    assert!(end.is_none() || end.unwrap().is_err());
}

#[tokio::test]
async fn health_should_report_the_log_service_serving() {
    let server = TestServer::start().await;
    let channel = tonic::transport::Endpoint::from_shared(server.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "log.v1.Log".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn reflection_should_list_and_describe_the_log_service() {
    use prost::Message as _;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let server = TestServer::start().await;

    let MessageResponse::ListServicesResponse(list) =
        crate::support::reflect(&server.url(""), MessageRequest::ListServices(String::new())).await
    else {
        panic!("expected a service list");
    };
    let names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "log.v1.Log",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.contains(expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(
        !names.contains("keel.raft.v1.Raft"),
        "a single node serves no Raft: {names:?}"
    );

    let MessageResponse::FileDescriptorResponse(files) = crate::support::reflect(
        &server.url(""),
        MessageRequest::FileContainingSymbol("log.v1.Log".into()),
    )
    .await
    else {
        panic!("expected file descriptors");
    };
    let files: Vec<prost_types::FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(&bytes[..]).unwrap())
        .collect();
    let log = files
        .iter()
        .filter(|file| file.package() == "log.v1")
        .flat_map(|file| &file.service)
        .find(|service| service.name() == "Log")
        .expect("log.v1.Log described");
    let methods: HashSet<&str> = log.method.iter().map(|m| m.name()).collect();
    for rpc in ["Produce", "Consume", "ConsumeStream", "ProduceStream"] {
        assert!(methods.contains(rpc), "{rpc} missing from {methods:?}");
    }
    let produce = log.method.iter().find(|m| m.name() == "Produce").unwrap();
    assert_eq!(produce.input_type(), ".log.v1.ProduceRequest");
    // The request's fields are described too, so a client can build one.
    let request = files
        .iter()
        .flat_map(|file| &file.message_type)
        .find(|message| message.name() == "ProduceRequest")
        .expect("ProduceRequest described");
    assert!(request.field.iter().any(|f| f.name() == "record"));
}

/// A client that has no code generated from keel's protos: grpcio's reflection
/// database learns the service's messages from the server, builds a
/// `ProduceRequest` from them, produces and consumes it back.
const PYTHON_REFLECTION_CLIENT: &str = r#"
import sys
import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

channel = grpc.insecure_channel(sys.argv[1])
database = ProtoReflectionDescriptorDatabase(channel)
assert "log.v1.Log" in database.get_services(), database.get_services()
pool = descriptor_pool.DescriptorPool(database)
service = pool.FindServiceByName("log.v1.Log")
methods = {m.name: m for m in service.methods}
for rpc in ("Produce", "Consume", "ConsumeStream", "ProduceStream"):
    assert rpc in methods, methods

def call(name, **fields):
    method = methods[name]
    request = message_factory.GetMessageClass(method.input_type)(**fields)
    answer = message_factory.GetMessageClass(method.output_type)
    rpc = channel.unary_unary(
        f"/log.v1.Log/{name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=answer.FromString,
    )
    return rpc(request, timeout=10)

record = message_factory.GetMessageClass(pool.FindMessageTypeByName("log.v1.Record"))
produced = call("Produce", topic="reflected", record=record(value=b"by reflection"))
consumed = call("Consume", topic="reflected", offset=produced.offset)
assert consumed.record.value == b"by reflection", consumed
print("ok", produced.offset)
"#;

#[tokio::test]
async fn a_client_built_from_reflection_alone_should_produce_and_consume() {
    if !crate::support::python_has("grpc, grpc_reflection", "grpcio and grpcio-reflection") {
        return;
    }
    let server = TestServer::start().await;
    let addr = server.url("").trim_start_matches("http://").to_owned();
    let printed = crate::support::run_python(PYTHON_REFLECTION_CLIENT, vec![addr]).await;
    assert_eq!(printed, "ok 0");
}

#[tokio::test]
async fn reflection_should_also_answer_in_v1alpha_for_older_clients() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let server = TestServer::start().await;
    let channel = tonic::transport::Endpoint::from_shared(server.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let answer = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .expect("an answer")
        .unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("expected a service list, got {answer:?}");
    };
    assert!(list.service.iter().any(|s| s.name == "log.v1.Log"));
}

#[tokio::test]
async fn client_should_say_when_nothing_listens() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    match Client::connect(&addr.to_string()).await {
        Err(err @ ClientError::Connect { .. }) => {
            assert!(err.to_string().contains(&addr.to_string()))
        }
        other => panic!("expected Connect error, got {other:?}"),
    }
}

#[tokio::test]
async fn full_write_queue_should_be_resource_exhausted_and_lose_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    // One waiting append at most, and no patience: concurrent producers overflow it.
    let tight = keel_log::LogServiceConfig {
        queue_depth: 1,
        enqueue_timeout: Duration::ZERO,
        ..config(dir.path())
    };
    let server = TestServer::start_with(tight).await;
    let mut tasks = Vec::new();
    for producer in 0..32 {
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let (mut acked, mut exhausted) = (Vec::new(), 0);
            for i in 0..20 {
                let value = format!("{producer}-{i}");
                match client.produce("busy", value.clone()).await {
                    Ok(offset) => acked.push((offset, value)),
                    Err(ClientError::Status(status))
                        if status.code() == Code::ResourceExhausted =>
                    {
                        assert!(
                            status.message().contains("overloaded"),
                            "{}",
                            status.message()
                        );
                        exhausted += 1;
                    }
                    Err(other) => panic!("unexpected error: {other}"),
                }
            }
            (acked, exhausted)
        }));
    }
    let mut exhausted_total = 0;
    let mut client = server.client().await;
    for task in tasks {
        let (acked, exhausted) = task.await.unwrap();
        exhausted_total += exhausted;
        for (offset, value) in acked {
            assert_eq!(client.consume("busy", offset).await.unwrap().value, value);
        }
    }
    assert!(
        exhausted_total > 0,
        "32 producers against a queue of one must overflow it"
    );
}

#[tokio::test]
async fn a_consumer_that_stops_reading_should_not_slow_producers() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client.produce("slow", "seed").await.unwrap();
    // Open a tail and never read it: its buffers fill, then its task waits.
    let stalled = client.subscribe("slow", 0, true, 64).await.unwrap();
    let values: Vec<Bytes> = (0..200).map(|_| Bytes::from(vec![1u8; 1000])).collect();
    let started = std::time::Instant::now();
    for _ in 0..50 {
        client.produce_batch("slow", values.clone()).await.unwrap();
    }
    assert_eq!(client.consume("slow", 10_000).await.unwrap().offset, 10_000);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "producers were held up"
    );
    drop(stalled);
}
