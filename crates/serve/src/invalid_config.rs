//! The one error every component's `validate` returns for a setting out of range.

use std::borrow::Cow;

/// A configuration value that cannot be used: which setting, and why. The binary
/// prints it and exits with 64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidConfig {
    /// The setting as it is named in the config file (`log.segment_bytes`,
    /// `check_interval`...).
    pub field: Cow<'static, str>,
    /// What is wrong with it and what to change.
    pub reason: String,
}

impl InvalidConfig {
    /// `field` is invalid because of `reason`.
    pub fn new(field: impl Into<Cow<'static, str>>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error for a setting nested under `section` (`log` + `sync` is
    /// `log.sync`).
    #[must_use]
    pub fn within(self, section: &str) -> Self {
        Self {
            field: Cow::Owned(format!("{section}.{}", self.field)),
            ..self
        }
    }
}
