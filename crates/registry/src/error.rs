//! The registry's error types: [`RegistryError`] for the server and its state,
//! [`RegistryClientError`] for its clients.

use keel_serve::InvalidConfig;

/// Everything a registry operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The request is malformed; `field` names what to fix.
    #[error("{field}: {message}")]
    BadRequest {
        /// The JSON field (or `body`).
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// No instance with that service name and id is registered.
    #[error("no instance {id:?} of service {name:?} is registered")]
    UnknownInstance {
        /// The service name.
        name: String,
        /// The instance id.
        id: String,
    },
    /// Another principal owns the instance, and the caller is no admin of its
    /// service.
    #[error(
        "instance {id:?} of service {name:?} belongs to {owner:?}: only its owner or an admin of the service may change or remove it"
    )]
    NotOwner {
        /// The service name.
        name: String,
        /// The instance id.
        id: String,
        /// Who owns it.
        owner: String,
    },
    /// The registry holds `max_instances` instances already and this registration
    /// would add one more.
    #[error(
        "the registry holds its maximum of {max} instances (max_instances); deregister some or raise the limit"
    )]
    Full {
        /// The limit.
        max: usize,
    },
    /// A URL of the registration reaches an address outside the registry's
    /// `allow_targets`; `field` names the URL.
    #[error("{field}: {message}")]
    TargetNotAllowed {
        /// The JSON field of the URL.
        field: &'static str,
        /// Which address is refused, and the list.
        message: String,
    },
    /// The ACL refuses the request.
    #[error(transparent)]
    Denied(#[from] keel_auth::Denied),
    /// The ACL file cannot be used.
    #[error(transparent)]
    Acl(#[from] keel_auth::AclError),
    /// The registry's configuration cannot be used (from [`crate::run`]).
    #[error(transparent)]
    InvalidConfig(#[from] InvalidConfig),
    /// The HTTP client for health checks and notifications could not be built.
    #[error("building the HTTP client failed: {0}")]
    HttpClient(#[source] reqwest::Error),
    /// A cluster node could not have the change committed (no leader, no majority,
    /// or not in time: it may still be committed), or could not confirm a
    /// linearizable read. Worth retrying, on this node or another.
    #[error("the registry cluster is unavailable: {0}")]
    Unavailable(String),
    /// Something the registry relies on failed (its random source).
    #[error("{0}")]
    Internal(String),
    /// A cluster node cannot take its place in the cluster (its membership flags
    /// or its Raft storage).
    #[error("{0}")]
    Cluster(String),
}

impl RegistryError {
    pub(crate) fn bad_request(field: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            field,
            message: message.into(),
        }
    }

    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "bad_request",
            Self::UnknownInstance { .. } => "unknown_instance",
            Self::Full { .. } => "registry_full",
            Self::TargetNotAllowed { .. } => "target_not_allowed",
            Self::NotOwner { .. } => "not_owner",
            Self::Denied(denied) => denied.code(),
            Self::InvalidConfig(_) | Self::Acl(_) => "invalid_config",
            Self::HttpClient(_) | Self::Cluster(_) | Self::Internal(_) => "internal",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

/// Why a call of [`crate::client::RegistryClient`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryClientError {
    /// The registry could not be reached, or did not answer in time.
    #[error("cannot reach the registry at {url}: {source}")]
    Unreachable {
        /// The URL called.
        url: String,
        /// Why: refused, timed out...
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an error status.
    #[error("the registry refused {what} ({status}): {body}")]
    Refused {
        /// What was asked: `the registration`, `the deregistration`...
        what: &'static str,
        /// The HTTP status.
        status: u16,
        /// The registry's error body, as sent.
        body: String,
    },
    /// The registry's answer is not what the API documents.
    #[error("the registry's answer to {what} is malformed: {source}")]
    Malformed {
        /// What was asked.
        what: &'static str,
        /// What the decoder said.
        #[source]
        source: reqwest::Error,
    },
}

/// The result type of this crate.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
