//! The service's error type, and the one place it is mapped to the wire: gRPC
//! status codes and HTTP responses with a JSON body.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keel_commitlog::LogError;
use keel_serve::InvalidConfig;
use keel_serve::http::{BodyError, ErrorBody};

/// Everything a log service request can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LogServiceError {
    /// The ACL refuses the request: no valid credentials, or not allowed.
    #[error(transparent)]
    Denied(#[from] keel_auth::Denied),
    /// The topic's log refused or failed the operation.
    #[error("topic {topic:?}: {source}")]
    Log {
        /// The topic.
        topic: String,
        /// What the log said. Shared: one failed group commit fails every request in it.
        #[source]
        source: Arc<LogError>,
    },
    /// The topic does not exist and topics are not created on first write.
    #[error("topic {topic:?} does not exist (create it by producing to it, or enable auto-create)")]
    UnknownTopic {
        /// The topic.
        topic: String,
    },
    /// The topic's log failed to open when the service started.
    #[error(
        "topic {topic:?} is unavailable: its log failed to open ({source}); stop the service, then repair it (`keel log repair --topic {topic}` cuts it at the damage) or remove its directory, and restart"
    )]
    TopicUnavailable {
        /// The topic.
        topic: String,
        /// Why it failed to open.
        source: Arc<LogError>,
    },
    /// A topic name breaks the naming rules.
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidTopic {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A request is malformed (bad JSON, bad base64, a missing field...).
    #[error("{0}")]
    BadRequest(String),
    /// A request body is larger than the configured limit.
    #[error("request body of {len} bytes is larger than the limit of {max} bytes")]
    BodyTooLarge {
        /// The body's size, as far as it was read.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The topic's write queue stayed full for the whole enqueue timeout.
    #[error("topic {topic:?} is overloaded: its write queue is full; retry with backoff")]
    Overloaded {
        /// The topic.
        topic: String,
    },
    /// Creating the topic would make more than `max_topics`.
    #[error(
        "topic {topic:?} cannot be created: the service has its maximum of {max} topics (max_topics); use an existing topic or raise the limit"
    )]
    TooManyTopics {
        /// The topic asked for.
        topic: String,
        /// The limit.
        max: usize,
    },
    /// The server is shutting down and takes no new work.
    #[error("the log service is shutting down")]
    ShuttingDown,
    /// A replica could not get the write committed: no leader is known, or the
    /// leader could not be reached or lost its leadership. Whether the write was
    /// stored is unknown; retry it (with its producer sequence, it is stored once).
    #[error("the cluster cannot take writes now: {0}; retry")]
    Unavailable(String),
    /// A replica's topic failed its checksums or lost records its last checkpoint
    /// made durable: the node discards its state and re-replicates it.
    #[error("topic {topic:?} of this replica is damaged: {reason}")]
    DamagedReplica {
        /// The topic.
        topic: String,
        /// What is wrong.
        reason: String,
    },
    /// A producer retried an append older than the appends the cluster remembers
    /// of it, so it cannot tell whether it is a duplicate.
    #[error(
        "the producer's sequence is older than the latest {window} it appended (latest: {latest}); the append was not stored and cannot be retried under that sequence",
        window = crate::replica::PRODUCER_WINDOW
    )]
    SequenceTooOld {
        /// The newest sequence the producer has appended.
        latest: u64,
    },
    /// The service's configuration cannot be used (from [`crate::run`]).
    #[error(transparent)]
    InvalidConfig(#[from] InvalidConfig),
    /// Listening or a serving thread failed (from [`crate::run`]).
    #[error("serving the log service failed: {0}")]
    Serve(#[source] Arc<std::io::Error>),
}

impl LogServiceError {
    pub(crate) fn log(topic: &str, source: impl Into<Arc<LogError>>) -> Self {
        Self::Log {
            topic: topic.to_owned(),
            source: source.into(),
        }
    }

    /// A stable, machine-readable code for the error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Log { source, .. } if is_storage_full(source) => "storage_full",
            Self::Log { source, .. } => match source.as_ref() {
                LogError::OffsetOutOfRange { .. } => "offset_out_of_range",
                LogError::RecordTooLarge { .. } => "record_too_large",
                LogError::Corrupt { .. } => "corrupt",
                LogError::Failed { .. } => "storage_failed",
                _ => "internal",
            },
            Self::UnknownTopic { .. } => "unknown_topic",
            Self::TopicUnavailable { .. } => "topic_unavailable",
            Self::InvalidTopic { .. } => "invalid_topic",
            Self::BadRequest(_) => "bad_request",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::Overloaded { .. } => "overloaded",
            Self::Denied(denied) => denied.code(),
            Self::TooManyTopics { .. } => "too_many_topics",
            Self::ShuttingDown => "shutting_down",
            Self::Unavailable(_) => "unavailable",
            Self::DamagedReplica { .. } => "corrupt",
            Self::SequenceTooOld { .. } => "sequence_too_old",
            Self::InvalidConfig(_) => "invalid_config",
            Self::Serve(_) => "internal",
        }
    }

    /// The gRPC status code for the error.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Self::Log { source, .. } if is_storage_full(source) => tonic::Code::ResourceExhausted,
            Self::Log { source, .. } => match source.as_ref() {
                LogError::OffsetOutOfRange { .. } => tonic::Code::OutOfRange,
                LogError::RecordTooLarge { .. } => tonic::Code::InvalidArgument,
                LogError::Corrupt { .. } => tonic::Code::DataLoss,
                LogError::Failed { .. } => tonic::Code::Unavailable,
                _ => tonic::Code::Internal,
            },
            Self::UnknownTopic { .. } => tonic::Code::NotFound,
            Self::TopicUnavailable { .. } => tonic::Code::Unavailable,
            Self::InvalidTopic { .. } | Self::BadRequest(_) => tonic::Code::InvalidArgument,
            Self::BodyTooLarge { .. } => tonic::Code::InvalidArgument,
            Self::Overloaded { .. } | Self::TooManyTopics { .. } => tonic::Code::ResourceExhausted,
            Self::Denied(keel_auth::Denied::Unauthenticated(_)) => tonic::Code::Unauthenticated,
            Self::Denied(keel_auth::Denied::Forbidden(_)) => tonic::Code::PermissionDenied,
            Self::ShuttingDown | Self::Unavailable(_) => tonic::Code::Unavailable,
            Self::SequenceTooOld { .. } => tonic::Code::FailedPrecondition,
            Self::DamagedReplica { .. } => tonic::Code::DataLoss,
            Self::InvalidConfig(_) | Self::Serve(_) => tonic::Code::Internal,
        }
    }

    /// The HTTP status for the error.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::Log { source, .. } if is_storage_full(source) => StatusCode::INSUFFICIENT_STORAGE,
            Self::Log { source, .. } => match source.as_ref() {
                LogError::OffsetOutOfRange { .. } => StatusCode::NOT_FOUND,
                LogError::RecordTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                LogError::Failed { .. } => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Self::UnknownTopic { .. } => StatusCode::NOT_FOUND,
            Self::TopicUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::InvalidTopic { .. } | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Denied(denied) => denied.status(),
            Self::TooManyTopics { .. } => StatusCode::INSUFFICIENT_STORAGE,
            Self::ShuttingDown | Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::SequenceTooOld { .. } => StatusCode::CONFLICT,
            Self::DamagedReplica { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Self::InvalidConfig(_) | Self::Serve(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<LogServiceError> for tonic::Status {
    fn from(err: LogServiceError) -> Self {
        if err.grpc_code() == tonic::Code::Internal {
            tracing::error!(error = %err, "internal error");
        }
        tonic::Status::new(err.grpc_code(), err.to_string())
    }
}

impl IntoResponse for LogServiceError {
    fn into_response(self) -> Response {
        let status = self.http_status();
        if status.is_server_error() {
            tracing::error!(error = %self, "internal error");
        }
        json_error(status, self.code(), &self.to_string())
    }
}

/// Whether the log failed because its disk is full (`ENOSPC`): the write was undone,
/// nothing acknowledged is lost, and the client may retry once space is freed.
pub(crate) fn is_storage_full(err: &LogError) -> bool {
    matches!(err, LogError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull)
}

impl From<BodyError> for LogServiceError {
    fn from(err: BodyError) -> Self {
        match err {
            BodyError::TooLarge { len, max } => Self::BodyTooLarge { len, max },
            other => Self::BadRequest(other.to_string()),
        }
    }
}

/// The JSON error body every HTTP error uses:
/// `{"error":{"code":"...","message":"..."}}`.
pub(crate) fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    ErrorBody::new(code, message).response(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_should_map_to_its_documented_code_and_status() {
        let out_of_range = LogServiceError::log(
            "t",
            LogError::OffsetOutOfRange {
                offset: 5,
                lowest: 0,
                next: 3,
            },
        );
        let too_large = LogServiceError::log("t", LogError::RecordTooLarge { len: 9, max: 8 });
        let io = LogServiceError::log(
            "t",
            LogError::Io {
                path: "/x".into(),
                source: std::io::Error::other("disk on fire"),
            },
        );
        let cases = [
            (
                out_of_range,
                tonic::Code::OutOfRange,
                StatusCode::NOT_FOUND,
                "offset_out_of_range",
            ),
            (
                too_large,
                tonic::Code::InvalidArgument,
                StatusCode::PAYLOAD_TOO_LARGE,
                "record_too_large",
            ),
            (
                io,
                tonic::Code::Internal,
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
            ),
            (
                LogServiceError::UnknownTopic { topic: "t".into() },
                tonic::Code::NotFound,
                StatusCode::NOT_FOUND,
                "unknown_topic",
            ),
            (
                LogServiceError::InvalidTopic {
                    name: "a/b".into(),
                    reason: "r",
                },
                tonic::Code::InvalidArgument,
                StatusCode::BAD_REQUEST,
                "invalid_topic",
            ),
            (
                LogServiceError::BadRequest("x".into()),
                tonic::Code::InvalidArgument,
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                LogServiceError::BodyTooLarge { len: 9, max: 8 },
                tonic::Code::InvalidArgument,
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
            ),
            (
                LogServiceError::Overloaded { topic: "t".into() },
                tonic::Code::ResourceExhausted,
                StatusCode::TOO_MANY_REQUESTS,
                "overloaded",
            ),
            (
                LogServiceError::ShuttingDown,
                tonic::Code::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
            ),
        ];
        for (err, grpc, http, code) in cases {
            assert_eq!(
                (err.grpc_code(), err.http_status(), err.code()),
                (grpc, http, code),
                "{err}"
            );
        }
    }
}
