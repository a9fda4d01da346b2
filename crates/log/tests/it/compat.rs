//! A client that knows only the original `log.v1` definition: messages with the
//! original field numbers and nothing else, called by method path. It must work
//! against keel unchanged.

use futures::StreamExt;
use tonic::codegen::http::uri::PathAndQuery;

use crate::support::TestServer;

#[derive(Clone, PartialEq, prost::Message)]
struct Record {
    #[prost(bytes = "vec", tag = "1")]
    value: Vec<u8>,
    #[prost(uint64, tag = "2")]
    offset: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProduceRequest {
    #[prost(message, optional, tag = "1")]
    record: Option<Record>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProduceResponse {
    #[prost(uint64, tag = "1")]
    offset: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ConsumeRequest {
    #[prost(uint64, tag = "1")]
    offset: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ConsumeResponse {
    #[prost(message, optional, tag = "2")]
    record: Option<Record>,
}

type Grpc = tonic::client::Grpc<tonic::transport::Channel>;

async fn original_client(server: &TestServer) -> Grpc {
    let channel = tonic::transport::Endpoint::from_shared(server.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

async fn produce(grpc: &mut Grpc, value: &[u8]) -> Result<u64, tonic::Status> {
    grpc.ready().await.unwrap();
    let request = ProduceRequest {
        record: Some(Record {
            value: value.to_vec(),
            offset: 0,
        }),
    };
    let codec = tonic_prost::ProstCodec::<ProduceRequest, ProduceResponse>::default();
    let response = grpc
        .unary(
            tonic::Request::new(request),
            PathAndQuery::from_static("/log.v1.Log/Produce"),
            codec,
        )
        .await?;
    Ok(response.into_inner().offset)
}

async fn consume(grpc: &mut Grpc, offset: u64) -> Result<Record, tonic::Status> {
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<ConsumeRequest, ConsumeResponse>::default();
    let response = grpc
        .unary(
            tonic::Request::new(ConsumeRequest { offset }),
            PathAndQuery::from_static("/log.v1.Log/Consume"),
            codec,
        )
        .await?;
    Ok(response.into_inner().record.expect("a record"))
}

#[tokio::test]
async fn original_client_should_produce_consume_and_stream_unchanged() {
    let server = TestServer::start().await;
    let mut grpc = original_client(&server).await;
    assert_eq!(produce(&mut grpc, b"first").await.unwrap(), 0);
    assert_eq!(produce(&mut grpc, b"second").await.unwrap(), 1);
    let record = consume(&mut grpc, 1).await.unwrap();
    assert_eq!(
        record,
        Record {
            value: b"second".to_vec(),
            offset: 1
        }
    );

    let status = consume(&mut grpc, 2).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange);

    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<ConsumeRequest, ConsumeResponse>::default();
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(ConsumeRequest { offset: 0 }),
            PathAndQuery::from_static("/log.v1.Log/ConsumeStream"),
            codec,
        )
        .await
        .unwrap()
        .into_inner();
    for expected in [&b"first"[..], b"second"] {
        let record = stream.next().await.unwrap().unwrap().record.unwrap();
        assert_eq!(record.value, expected);
    }
}

#[tokio::test]
async fn records_of_the_original_client_should_be_readable_by_keel_clients() {
    let server = TestServer::start().await;
    let mut grpc = original_client(&server).await;
    produce(&mut grpc, b"from the original").await.unwrap();
    let mut client = server.client().await;
    let record = client.consume("", 0).await.unwrap();
    assert_eq!(&record.value[..], b"from the original");
    assert!(
        record.timestamp_ms > 0,
        "keel's extra field is there for keel clients"
    );
}
