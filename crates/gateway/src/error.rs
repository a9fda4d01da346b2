//! The gateway's errors: what failed, on which side, and whether the request may go
//! to another instance.

use std::time::Duration;

use http::StatusCode;
use keel_serve::InvalidConfig;

/// Which side of the gateway an error comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client: a malformed or unroutable request, a body that broke off.
    Downstream,
    /// The instance the request went to.
    Upstream,
    /// The gateway itself: its config, its client, its listeners.
    Internal,
}

/// Everything the gateway can fail with: starting, and each request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The gateway's configuration cannot be used (from [`crate::run`]).
    #[error(transparent)]
    InvalidConfig(#[from] InvalidConfig),
    /// The registry client could not be built.
    #[error("building the registry client failed: {0}")]
    RegistryClient(#[source] reqwest::Error),
    /// A listener or a serving thread failed.
    #[error("serving the gateway failed: {0}")]
    Serve(#[source] std::io::Error),
    /// The request head is larger than the limits.
    #[error("{0}")]
    HeadTooLarge(String),
    /// The request is malformed, or its body broke off.
    #[error("{0}")]
    BadRequest(String),
    /// The request uses a feature the gateway does not implement (a transfer coding).
    #[error("{0}")]
    NotImplemented(String),
    /// The client was too slow: its request head did not arrive within
    /// `header_timeout`, or its body paused for longer than `body_timeout`.
    #[error("the request {part} did not arrive within {after:?}")]
    RequestTimeout {
        /// `head` or `body`.
        part: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// The path names no service.
    #[error("no service in the path: use /{{service}}/...")]
    NoService,
    /// The path's first segment cannot be a service name.
    #[error("no service named {segment:?}")]
    InvalidService {
        /// The segment as given.
        segment: String,
    },
    /// No service of that name is registered.
    #[error("service {service:?} is not registered")]
    UnknownService {
        /// The service.
        service: String,
    },
    /// The service is registered, but no instance of it is healthy or left to try.
    #[error("service {service:?} has no healthy instance")]
    NoHealthyInstance {
        /// The service.
        service: String,
    },
    /// The exchange with an instance failed.
    #[error("instance {url} of {service:?} failed: {source}")]
    Upstream {
        /// The instance's URL.
        url: String,
        /// Its service.
        service: String,
        /// What went wrong.
        #[source]
        source: UpstreamError,
    },
    /// An instance did not answer within the request timeout.
    #[error("instance {url} of {service:?} did not answer within {after:?}")]
    UpstreamTimeout {
        /// The instance's URL.
        url: String,
        /// Its service.
        service: String,
        /// The request timeout.
        after: Duration,
    },
}

/// What went wrong in an exchange with an instance.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// No connection could be made: nothing was sent.
    #[error("connect failed: {0}")]
    Connect(#[source] std::io::Error),
    /// Writing the request head (and a buffered body) failed.
    #[error("sending the request failed: {0}")]
    Send(#[source] std::io::Error),
    /// Writing a streamed request body failed.
    #[error("sending the request body failed: {0}")]
    SendBody(#[source] std::io::Error),
    /// Reading the response failed.
    #[error("reading the response failed: {0}")]
    Read(#[source] std::io::Error),
    /// The instance closed the connection while the request body was under way.
    #[error("the upstream closed the connection during the request body")]
    ClosedDuringBody,
    /// The instance closed the connection before its response's head.
    #[error("the upstream closed the connection before responding")]
    ClosedBeforeResponse,
    /// The instance responded 101.
    #[error("the upstream switched protocols, which the gateway does not relay")]
    SwitchedProtocols,
    /// The response's head is malformed or too large.
    #[error("{0}")]
    MalformedResponse(String),
    /// The instance did not read the request, or did not respond, within the request
    /// timeout; [`GatewayError::UpstreamTimeout`] says which instance and how long.
    #[error("timed out")]
    TimedOut,
}

impl GatewayError {
    /// The side that failed.
    pub fn side(&self) -> Side {
        match self {
            Self::InvalidConfig(_) | Self::RegistryClient(_) | Self::Serve(_) => Side::Internal,
            Self::HeadTooLarge(_)
            | Self::BadRequest(_)
            | Self::NotImplemented(_)
            | Self::RequestTimeout { .. }
            | Self::NoService
            | Self::InvalidService { .. }
            | Self::UnknownService { .. }
            | Self::NoHealthyInstance { .. } => Side::Downstream,
            Self::Upstream { .. } | Self::UpstreamTimeout { .. } => Side::Upstream,
        }
    }

    /// Whether the request may be sent to another instance after this error: when
    /// nothing was sent (the connection failed), or when it was sent whole and its
    /// method is `idempotent`. A timeout is not retried: the instance may still be at
    /// work on it, and the client has waited long enough.
    pub fn retry_safe(&self, idempotent: bool) -> bool {
        match self {
            Self::Upstream {
                source: UpstreamError::Connect(_),
                ..
            } => true,
            Self::Upstream { .. } => idempotent,
            _ => false,
        }
    }

    /// Whether the error counts against the instance's passive health.
    pub fn blames_instance(&self) -> bool {
        matches!(self, Self::Upstream { .. } | Self::UpstreamTimeout { .. })
    }

    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidConfig(_) | Self::RegistryClient(_) | Self::Serve(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Self::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::NoService | Self::InvalidService { .. } | Self::UnknownService { .. } => {
                StatusCode::NOT_FOUND
            }
            Self::NoHealthyInstance { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The stable code of the JSON error body (docs/api/gateway.md).
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidConfig(_) | Self::RegistryClient(_) | Self::Serve(_) => "internal",
            Self::HeadTooLarge(_) => "headers_too_large",
            Self::BadRequest(_) => "bad_request",
            Self::NotImplemented(_) => "not_implemented",
            Self::RequestTimeout { .. } => "request_timeout",
            Self::NoService => "no_service",
            Self::InvalidService { .. } | Self::UnknownService { .. } => "unknown_service",
            Self::NoHealthyInstance { .. } => "no_healthy_instance",
            Self::Upstream { .. } => "upstream_failed",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
        }
    }
}

/// Which end broke an exchange with an instance.
pub(crate) enum Fault {
    /// The client: its body broke off or was malformed. Nothing to retry.
    Downstream(GatewayError),
    /// The instance, or the connection to it.
    Upstream(UpstreamError),
}

impl From<UpstreamError> for Fault {
    fn from(err: UpstreamError) -> Self {
        Self::Upstream(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(source: UpstreamError) -> GatewayError {
        GatewayError::Upstream {
            url: "http://a".into(),
            service: "s".into(),
            source,
        }
    }

    #[test]
    fn only_a_failed_connect_or_a_sent_idempotent_request_should_be_retried() {
        let refused = || UpstreamError::Connect(std::io::ErrorKind::ConnectionRefused.into());
        assert!(upstream(refused()).retry_safe(false));
        assert!(upstream(UpstreamError::ClosedBeforeResponse).retry_safe(true));
        assert!(!upstream(UpstreamError::ClosedBeforeResponse).retry_safe(false));
        let timeout = GatewayError::UpstreamTimeout {
            url: "http://a".into(),
            service: "s".into(),
            after: Duration::from_secs(1),
        };
        assert!(!timeout.retry_safe(true));
        assert!(!GatewayError::BadRequest("cut".into()).retry_safe(true));
    }

    #[test]
    fn each_error_should_name_its_side_status_and_code() {
        let cases = [
            (
                GatewayError::NoService,
                Side::Downstream,
                StatusCode::NOT_FOUND,
                "no_service",
            ),
            (
                GatewayError::NoHealthyInstance {
                    service: "s".into(),
                },
                Side::Downstream,
                StatusCode::SERVICE_UNAVAILABLE,
                "no_healthy_instance",
            ),
            (
                upstream(UpstreamError::SwitchedProtocols),
                Side::Upstream,
                StatusCode::BAD_GATEWAY,
                "upstream_failed",
            ),
            (
                GatewayError::Serve(std::io::ErrorKind::AddrInUse.into()),
                Side::Internal,
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
            ),
        ];
        for (err, side, status, code) in cases {
            assert_eq!((err.side(), err.status(), err.code()), (side, status, code));
        }
        assert!(
            upstream(UpstreamError::ClosedBeforeResponse)
                .to_string()
                .starts_with("instance http://a of \"s\" failed: the upstream closed")
        );
    }
}
