//! The registry's error type.

/// Everything a registry operation can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
